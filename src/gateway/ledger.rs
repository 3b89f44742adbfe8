//! The mock gateway's audit ledger: one JSON line per call received, fsynced before the
//! gateway answers, reloaded at start so that the gateway's memory of idempotency keys
//! survives a restart of the service (as a real gateway's would).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerOp {
    Charge,
    Refund,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerOutcome {
    Succeeded,
    Declined,
}

/// One call the gateway received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    pub op: LedgerOp,
    pub idempotency_key: String,
    pub payment_id: String,
    pub amount: u64,
    pub outcome: LedgerOutcome,
    /// The charge or refund ID, when the operation succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// True when the key was already known: nothing was done, the original result was answered.
    pub replay: bool,
}

/// An append-only JSONL file.
#[derive(Debug)]
pub(crate) struct Ledger {
    path: PathBuf,
    file: File,
}

impl Ledger {
    /// Opens (creating if needed) the ledger and returns the entries already in it.
    pub(crate) fn open(path: &Path) -> anyhow::Result<(Self, Vec<LedgerEntry>)> {
        let mut entries = Vec::new();
        if path.exists() {
            let reader = BufReader::new(
                File::open(path).with_context(|| format!("reading ledger {}", path.display()))?,
            );
            for (n, line) in reader.lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str(&line) {
                    Ok(entry) => entries.push(entry),
                    // A torn last line is what a crash mid-append leaves: the call it records
                    // was never answered, so it may be dropped. Anywhere else it is corruption.
                    Err(e) => {
                        tracing::warn!(line = n + 1, error = %e, path = %path.display(), "skipping unreadable ledger line")
                    }
                }
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening ledger {}", path.display()))?;
        // Start on a fresh line after a torn one, or the next entry would be glued to it.
        let len = file.metadata()?.len();
        if len > 0 && std::fs::read(path)?.last() != Some(&b'\n') {
            file.write_all(b"\n")?;
        }
        Ok((
            Self {
                path: path.to_owned(),
                file,
            },
            entries,
        ))
    }

    /// Appends one entry and waits until it is on disk.
    pub(crate) fn append(&mut self, entry: &LedgerEntry) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(entry)?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("appending to ledger {}", self.path.display()))
    }
}

/// Reads every entry of a ledger file (for tests and audits).
pub fn read_ledger(path: &Path) -> anyhow::Result<Vec<LedgerEntry>> {
    Ok(Ledger::open(path)?.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopen_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let entry = LedgerEntry {
            op: LedgerOp::Charge,
            idempotency_key: "charge:p1".into(),
            payment_id: "p1".into(),
            amount: 100,
            outcome: LedgerOutcome::Succeeded,
            id: Some("ch_1".into()),
            replay: false,
        };
        {
            let (mut ledger, existing) = Ledger::open(&path).unwrap();
            assert!(existing.is_empty());
            ledger.append(&entry).unwrap();
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"op\":\"cha")
            .unwrap();
        assert_eq!(read_ledger(&path).unwrap(), vec![entry.clone()]);
        // An entry appended after the torn line is readable.
        Ledger::open(&path).unwrap().0.append(&entry).unwrap();
        assert_eq!(
            read_ledger(&path).unwrap(),
            vec![entry.clone(), entry.clone()]
        );
        let line = std::fs::read_to_string(&path).unwrap();
        assert!(line.starts_with(r#"{"op":"charge","idempotencyKey":"charge:p1","paymentId":"p1","amount":100,"outcome":"succeeded","id":"ch_1","replay":false}"#), "{line}");
    }
}
