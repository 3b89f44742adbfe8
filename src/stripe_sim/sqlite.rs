//! The `mock-gateway` process's store: SQLite, so that keys and intents survive SIGKILL.
//!
//! WAL with `synchronous=FULL`: a commit returns once its WAL frames are fsynced, so what a
//! call did is on disk before it is answered (NORMAL would survive a killed process too, the
//! WAL being in the page cache, but not a machine that loses power; the mock's writes are few
//! and the JSONL ledger fsyncs each line anyway). `locking_mode=EXCLUSIVE`: one gateway per
//! database, as the keys in flight live in its memory.
//!
//! The ledger's lines are rows of the same transaction, and the JSONL file is their copy,
//! appended after the commit: a process killed in between is caught up at the next start (the
//! rows the file lacks are appended), so the file never misses an action the database holds.

use std::path::Path;

use anyhow::Context as _;
use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use super::ledger::{Ledger, LedgerEntry};
use super::model::{AnswerKind, Intent, IntentStatus, KeyRecord};
use super::{Commit, Store};

pub struct SqliteStore {
    db: Connection,
    ledger: Option<Ledger>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    key TEXT PRIMARY KEY,
    fingerprint INTEGER NOT NULL,
    at INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    status INTEGER NOT NULL,
    n INTEGER NOT NULL,
    intent BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_at ON keys(at);
CREATE TABLE IF NOT EXISTS intents (
    id BLOB PRIMARY KEY,
    payment_id TEXT NOT NULL,
    created INTEGER NOT NULL,
    body TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS intents_payment ON intents(payment_id, created);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY,
    line TEXT NOT NULL
);
";

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` (`:memory:` for one that dies with
    /// the process), and the JSONL ledger at `ledger`, caught up with the database.
    pub fn open(path: &Path, ledger: Option<&Path>) -> anyhow::Result<Self> {
        let db = Connection::open(path)
            .with_context(|| format!("opening database {}", path.display()))?;
        db.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        let mode: String = db.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if mode != "wal" && path != Path::new(":memory:") {
            anyhow::bail!("database {}: journal mode {mode}, not WAL", path.display());
        }
        db.pragma_update(None, "synchronous", "FULL")?;
        // Takes the exclusive lock now rather than at the first write.
        db.execute_batch(&format!("BEGIN EXCLUSIVE; {SCHEMA} COMMIT;"))
            .with_context(|| {
                format!(
                    "database {} (in use by another mock-gateway?)",
                    path.display()
                )
            })?;
        let ledger = match ledger {
            None => None,
            Some(file) => Some(catch_up(&db, file)?),
        };
        let intents: i64 = db.query_row("SELECT count(*) FROM intents", [], |r| r.get(0))?;
        let keys: i64 = db.query_row("SELECT count(*) FROM keys", [], |r| r.get(0))?;
        tracing::info!(db = %path.display(), intents, keys, "gateway database opened");
        Ok(Self { db, ledger })
    }
}

/// Appends to the ledger file the lines the database holds and the file lacks.
fn catch_up(db: &Connection, file: &Path) -> anyhow::Result<Ledger> {
    let (mut ledger, entries) = Ledger::open(file)?;
    let rows: i64 = db.query_row("SELECT count(*) FROM ledger", [], |r| r.get(0))?;
    let have = entries.len() as i64;
    anyhow::ensure!(
        have <= rows,
        "ledger {} has {have} lines, more than the database's {rows}: another database's ledger?",
        file.display()
    );
    let mut stmt = db.prepare("SELECT line FROM ledger WHERE seq > ?1 ORDER BY seq")?;
    let missing = stmt.query_map([have], |r| r.get::<_, String>(0))?;
    let mut caught_up = 0;
    for line in missing {
        let entry: LedgerEntry = serde_json::from_str(&line?)?;
        ledger.append(&entry)?;
        caught_up += 1;
    }
    if caught_up > 0 {
        tracing::warn!(file = %file.display(), lines = caught_up, "ledger file caught up with the database");
    }
    Ok(ledger)
}

fn intent_of(body: String) -> rusqlite::Result<Intent> {
    serde_json::from_str(&body).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

impl Store for SqliteStore {
    fn blocks(&self) -> bool {
        true
    }

    fn records(&self) -> bool {
        true
    }

    fn key(&mut self, key: &str) -> anyhow::Result<Option<KeyRecord>> {
        let row = self
            .db
            .prepare_cached(
                "SELECT fingerprint, at, kind, status, n, intent FROM keys WHERE key = ?1",
            )?
            .query_row([key], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, u8>(2)?,
                    r.get::<_, u8>(3)?,
                    r.get::<_, u16>(4)?,
                    r.get::<_, Vec<u8>>(5)?,
                ))
            })
            .optional()?;
        let Some((fingerprint, at, kind, status, n, intent)) = row else {
            return Ok(None);
        };
        Ok(Some(KeyRecord {
            fingerprint: fingerprint as u64,
            at: at as u32,
            kind: AnswerKind::from_u8(kind).context("unknown answer kind")?,
            status: IntentStatus::from_u8(status).context("unknown status")?,
            n,
            intent: Uuid::from_slice(&intent)?,
        }))
    }

    fn intent(&mut self, id: &Uuid) -> anyhow::Result<Option<Intent>> {
        Ok(self
            .db
            .prepare_cached("SELECT body FROM intents WHERE id = ?1")?
            .query_row([id.as_bytes().as_slice()], |r| intent_of(r.get(0)?))
            .optional()?)
    }

    fn search(&mut self, payment_id: &str) -> anyhow::Result<Vec<Intent>> {
        let mut stmt = self
            .db
            .prepare_cached("SELECT body FROM intents WHERE payment_id = ?1 ORDER BY created")?;
        let rows = stmt.query_map([payment_id], |r| intent_of(r.get(0)?))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn commit(&mut self, commit: Commit<'_>) -> anyhow::Result<()> {
        let entry = commit
            .line
            .context("the gateway database records every call")?;
        let line = serde_json::to_string(entry)?;
        let tx = self.db.transaction()?;
        if let Some((key, rec)) = commit.key {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO keys (key, fingerprint, at, kind, status, n, intent)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                key,
                rec.fingerprint as i64,
                i64::from(rec.at),
                rec.kind as u8,
                rec.status as u8,
                rec.n,
                rec.intent.as_bytes().as_slice(),
            ])?;
        }
        if let Some(intent) = commit.intent {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO intents (id, payment_id, created, body) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                intent.id.as_bytes().as_slice(),
                intent.metadata.payment_id(),
                intent.created as i64,
                serde_json::to_string(intent)?,
            ])?;
        }
        tx.prepare_cached("INSERT INTO ledger (line) VALUES (?1)")?
            .execute([&line])?;
        tx.commit().context("committing to the gateway database")?;
        if let Some(ledger) = &mut self.ledger {
            ledger.append(entry)?;
        }
        Ok(())
    }

    fn forget_keys_before(&mut self, at: u32) -> anyhow::Result<usize> {
        Ok(self
            .db
            .execute("DELETE FROM keys WHERE at < ?1", [i64::from(at)])?)
    }

    fn settling(&mut self) -> anyhow::Result<Vec<Intent>> {
        // Once, at start: a scan of the bodies rather than an index every commit would pay for.
        let mut stmt = self
            .db
            .prepare("SELECT body FROM intents WHERE body LIKE '%\"settles_at\":%'")?;
        let rows = stmt.query_map([], |r| intent_of(r.get(0)?))?;
        let intents: Vec<Intent> = rows.collect::<Result<_, _>>()?;
        Ok(intents
            .into_iter()
            .filter(|i| i.settles_at.is_some())
            .collect())
    }
}
