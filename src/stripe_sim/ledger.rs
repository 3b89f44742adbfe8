//! The simulated gateway's audit ledger: one JSON line per call received, fsynced before the
//! gateway answers. The in-process mock reloads it at start so that its memory of idempotency
//! keys survives a restart of the service (as a real gateway's would); `mock-gateway` keeps its
//! state in SQLite and writes the same lines.
//!
//! Readers count what the gateway did from the lines that acted: `op` `charge` (a confirmation:
//! money taken when `outcome` is `succeeded`), `capture` (a hold's money taken) and `refund`,
//! with `replay` false and `outcome` `succeeded` or `declined`; `authorize` (a confirmation
//! with manual capture) holds money and takes none. Lines of calls that did not act say so:
//! `replay` (the key's first answer was repeated), `outcome` `rejected` (refused: a key reused
//! with other parameters or still in use, a refund above what is left, a cancel of a succeeded
//! intent) or `failed` (an injected 5xx, 429 or hang, before acting). Intents created without
//! confirming (`op` `create`) and cancels (`op` `cancel`, a hold's release among them) move no
//! money. A confirmation that settles later (`op` `process`: processing, or waiting on the
//! customer) moves none either; its settlement is a line of its own, with no idempotency key
//! (the gateway acting by itself): `charge` or `authorize`, `succeeded` or `declined`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerOp {
    /// A PaymentIntent confirmed (created with `confirm=true`, or confirmed): money taken when
    /// it succeeded.
    Charge,
    Refund,
    /// A PaymentIntent created without confirming: no money moves.
    Create,
    /// A PaymentIntent cancelled (a hold among them: released).
    Cancel,
    /// A PaymentIntent confirmed with manual capture: the money held, none taken.
    Authorize,
    /// A hold captured: money taken (`amount`, when it is less than the hold).
    Capture,
    /// A PaymentIntent confirmed that settles later (`processing`, with `settlesAt`) or waits
    /// on the customer (`requires_action`): no money yet.
    Process,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerOutcome {
    Succeeded,
    Declined,
    /// The gateway refused the call and did nothing (`error` says why).
    Rejected,
    /// An injected fault (`fault`) answered before the gateway acted.
    Failed,
}

/// A fault the gateway was told to inject into a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerFault {
    /// A 5xx or 429 (over HTTP) or an unknown outcome (in process), before acting.
    Error,
    /// The call was never answered, before acting.
    Hang,
    /// The gateway acted and recorded it, then lost the answer.
    Drop,
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
    /// When the call was received, in milliseconds since the Unix epoch (keys expire after the
    /// gateway's retention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<u64>,
    /// A digest of the call's parameters (what a repeat of the key must match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<String>,
    /// The PaymentIntent a refund, confirm or cancel was for, or that a declined create made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    /// Why a call was rejected (Stripe's error code or type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<LedgerFault>,
    /// A `process` line's intent settles by itself then (milliseconds since the Unix epoch);
    /// without it, the intent waits on the customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settles_at: Option<u64>,
    /// A `process` line's intent was created with manual capture: it settles to a hold.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub manual_capture: bool,
}

impl LedgerEntry {
    /// An entry with only the fields every line has.
    pub fn new(
        op: LedgerOp,
        idempotency_key: impl Into<String>,
        payment_id: impl Into<String>,
        amount: u64,
        outcome: LedgerOutcome,
    ) -> Self {
        Self {
            op,
            idempotency_key: idempotency_key.into(),
            payment_id: payment_id.into(),
            amount,
            outcome,
            id: None,
            replay: false,
            at: None,
            params: None,
            intent: None,
            error: None,
            fault: None,
            settles_at: None,
            manual_capture: false,
        }
    }

    /// Whether the gateway did what the call asked (not a replay, a refusal or a fault):
    /// declines included, as a decline is the gateway acting.
    pub fn acted(&self) -> bool {
        !self.replay
            && matches!(
                self.outcome,
                LedgerOutcome::Succeeded | LedgerOutcome::Declined
            )
    }
}

/// An append-only JSONL file.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    file: File,
}

impl Ledger {
    /// Opens (creating if needed) the ledger and returns the entries already in it. A torn
    /// last line (a crash mid-append: that call was never answered) is cut off; a line that
    /// does not parse anywhere else is corruption, and an error.
    pub fn open(path: &Path) -> anyhow::Result<(Self, Vec<LedgerEntry>)> {
        let read = read_ledger(path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening ledger {}", path.display()))?;
        // One writer: two processes appending to one ledger would each believe it knows every
        // key. The lock goes with the file, at exit or crash.
        file.try_lock().map_err(|e| {
            anyhow::anyhow!(
                "ledger {} is in use by another process ({e}): one gateway per ledger",
                path.display()
            )
        })?;
        let bytes = std::fs::read(path)?;
        if !bytes.is_empty() && bytes.last() != Some(&b'\n') {
            let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            tracing::warn!(path = %path.display(), bytes = bytes.len() - keep, "cutting off a torn last ledger line");
            file.set_len(keep as u64)?;
            file.sync_data()?;
        }
        Ok((
            Self {
                path: path.to_owned(),
                file,
            },
            read.entries,
        ))
    }

    /// Appends one entry and waits until it is on disk.
    pub fn append(&mut self, entry: &LedgerEntry) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(entry)?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("appending to ledger {}", self.path.display()))
    }
}

/// A ledger as an auditor reads it: every entry, and the torn last line a crash mid-append
/// may leave (that call was never answered).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerRead {
    pub entries: Vec<LedgerEntry>,
    pub torn_tail: Option<String>,
}

/// Reads a ledger file without writing to it (for tests and audits); a missing file is an
/// empty ledger. A last line that does not parse is returned as the torn tail; any other line
/// that does not parse is an error.
pub fn read_ledger(path: &Path) -> anyhow::Result<LedgerRead> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LedgerRead::default()),
        Err(e) => return Err(e).with_context(|| format!("reading ledger {}", path.display())),
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut read = LedgerRead::default();
    for (n, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(entry) => read.entries.push(entry),
            Err(_) if n + 1 == lines.len() => read.torn_tail = Some((*line).to_owned()),
            Err(e) => anyhow::bail!("ledger {} line {}: {e}: {line}", path.display(), n + 1),
        }
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopen_a_torn_tail_is_cut_and_corruption_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let entry = LedgerEntry {
            id: Some("ch_1".into()),
            ..LedgerEntry::new(
                LedgerOp::Charge,
                "charge:p1",
                "p1",
                100,
                LedgerOutcome::Succeeded,
            )
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
        let read = read_ledger(&path).unwrap();
        assert_eq!(read.entries, vec![entry.clone()]);
        assert_eq!(read.torn_tail.as_deref(), Some(r#"{"op":"cha"#));
        // Opening cuts the torn line off; an entry appended after it is readable.
        Ledger::open(&path).unwrap().0.append(&entry).unwrap();
        let read = read_ledger(&path).unwrap();
        assert_eq!(read.entries, vec![entry.clone(), entry.clone()]);
        assert_eq!(read.torn_tail, None);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(r#"{"op":"charge","idempotencyKey":"charge:p1","paymentId":"p1","amount":100,"outcome":"succeeded","id":"ch_1","replay":false}"#), "{text}");
        // A line that does not parse in the middle is corruption, not a torn append.
        std::fs::write(&path, format!("garbage\n{text}")).unwrap();
        assert!(read_ledger(&path).is_err());
        assert!(Ledger::open(&path).is_err());
    }

    #[test]
    fn a_line_torn_inside_a_character_is_cut_off_and_one_writer_holds_the_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let entry = LedgerEntry {
            id: Some("re_1".into()),
            ..LedgerEntry::new(
                LedgerOp::Refund,
                "refund:p€",
                "p€",
                5,
                LedgerOutcome::Succeeded,
            )
        };
        Ledger::open(&path).unwrap().0.append(&entry).unwrap();
        let line = serde_json::to_vec(&entry).unwrap();
        let cut = line.iter().position(|&b| b == 0xE2).unwrap() + 2; // inside the euro sign
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&line[..cut]).unwrap();
        drop(f);
        assert!(read_ledger(&path).unwrap().torn_tail.is_some());
        let (ledger, entries) = Ledger::open(&path).unwrap();
        assert_eq!(entries, vec![entry.clone()]);
        assert!(std::fs::read(&path).unwrap().ends_with(b"\n"));
        // While it is open, no other writer gets it.
        let other = Ledger::open(&path).unwrap_err();
        assert!(format!("{other:#}").contains("in use"), "{other:#}");
        drop(ledger);
        assert!(Ledger::open(&path).is_ok());
    }
}
