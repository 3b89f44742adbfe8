//! The in-process store: tables in memory, made durable by the ledger (each line appended and
//! fsynced before the call is answered, replayed at start).
//!
//! The service's own memory holds it, so it is kept small: a key is remembered by a 128-bit
//! keyed digest rather than as a string, with a 32-byte [`KeyRecord`] (two keys collide with
//! probability 2^-128; the ledger keeps the keys themselves). The tables are sharded so that
//! they grow in small steps: one table doubles to megabytes (3 to 6 MB at ~57,000 keys), and
//! glibc then raises its mmap threshold for good, which made the service's CPU per payment
//! grow by about a fifth from there on (README "Performance"). 256 shards stay under glibc's
//! default 128 KiB threshold up to ~450,000 keys.
//!
//! An intent is kept the same way when it can be: a succeeded intent (what nearly every
//! in-process charge leaves) is a 16-byte [`Slim`] record, without its metadata (found by its
//! payment ID's digest; the in-process gateway never reads that metadata back), and its
//! refunds, if any, [`SlimRefund`]s beside it that keep only the refund's key (what
//! `find_refund` reads back). Any other intent (open, declined, cancelled, held for a manual
//! capture) is kept whole: its metadata decides a later confirmation's decline and names the
//! payment in a cancel's ledger line.
//!
//! What the ledger does not carry (a currency, metadata beyond the payment ID and a refund's
//! key) comes back after a restart as `usd` and without it: the in-process gateway reads
//! neither.

use std::collections::hash_map::Entry;
use std::hash::Hash;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
// Its keys are digests and random intent IDs already: SipHash's protection against chosen
// keys buys nothing here, and costs about a tenth of the in-process gateway's work per call.
use foldhash::HashMap;
use uuid::Uuid;

use super::ledger::{Ledger, LedgerEntry, LedgerOp, LedgerOutcome};
use super::model::{self, AnswerKind, Currency, Intent, IntentStatus, KeyRecord, Metadata, Refund};
use super::{Commit, Digester, Store};

const SHARDS: usize = 256;

struct Sharded<K, V>(Vec<HashMap<K, V>>);

impl<K: Hash + Eq, V> Sharded<K, V> {
    fn new() -> Self {
        Self((0..SHARDS).map(|_| HashMap::default()).collect())
    }

    fn shard(&mut self, byte: u8) -> &mut HashMap<K, V> {
        &mut self.0[usize::from(byte)]
    }

    fn len(&self) -> usize {
        self.0.iter().map(HashMap::len).sum()
    }
}

/// A succeeded intent without refunds, as the in-process gateway leaves nearly every one: 16
/// bytes, no allocation. Its metadata is not kept (the payment ID's digest indexes it for
/// search): the in-process gateway never reads a succeeded intent's metadata back (a cancel or
/// confirm of it, whose ledger line would name the payment from it, is never sent).
#[derive(Debug, Clone, Copy)]
struct Slim {
    amount: u64,
    created: u32,
    currency: Currency,
    /// 0: none; n: `methods[n - 1]`.
    method: u8,
}

const _: () = assert!(std::mem::size_of::<Slim>() == 16);

/// A refund of a slim intent: of its metadata only its idempotency key, which the in-process
/// gateway's `find_refund` matches (a whole refund, with its metadata's strings, took about
/// three times the memory).
#[derive(Debug, Clone)]
struct SlimRefund {
    amount: u64,
    created: u32,
    key: Box<str>,
}

pub struct MemoryStore {
    keys: Sharded<u128, KeyRecord>,
    /// Intents kept compact ([`Slim`]).
    slim: Sharded<Uuid, Slim>,
    /// The refunds of slim intents, oldest first.
    refunds: Sharded<Uuid, Vec<SlimRefund>>,
    /// Every other intent, whole (open, cancelled, declined: few).
    full: Sharded<Uuid, Intent>,
    /// A payment's first intent ...
    by_payment: Sharded<u128, Uuid>,
    /// ... and its later ones, oldest first (rare: one intent per payment is the rule).
    more: HashMap<u128, Vec<Uuid>>,
    /// The payment methods slim intents name (the in-process gateway uses one).
    methods: Vec<Box<str>>,
    digest: Digester,
    ledger: Option<Ledger>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("keys", &self.keys.len())
            .field("intents", &(self.slim.len() + self.full.len()))
            .finish_non_exhaustive()
    }
}

fn low(d: u128) -> u8 {
    d as u8
}

fn uuid_shard(id: &Uuid) -> u8 {
    id.as_bytes()[15]
}

impl MemoryStore {
    /// A store without a ledger: forgotten with the process.
    pub fn new() -> Self {
        Self {
            keys: Sharded::new(),
            slim: Sharded::new(),
            refunds: Sharded::new(),
            full: Sharded::new(),
            by_payment: Sharded::new(),
            more: HashMap::default(),
            methods: Vec::new(),
            digest: Digester::default(),
            ledger: None,
        }
    }

    /// A store over the ledger at `path`, rebuilt from its lines; keys first used more than
    /// `retention` before `now_ms` are not remembered.
    pub fn open(path: &Path, retention: Duration, now_ms: u64) -> anyhow::Result<Self> {
        let (ledger, entries) = Ledger::open(path)?;
        let mut store = Self::new();
        let oldest = (now_ms / 1000).saturating_sub(retention.as_secs());
        for (n, entry) in entries.iter().enumerate() {
            store
                .replay(entry, oldest, now_ms)
                .with_context(|| format!("ledger {} line {}: {entry:?}", path.display(), n + 1))?;
        }
        tracing::info!(
            path = %path.display(),
            keys = store.keys.len(),
            intents = store.slim.len() + store.full.len(),
            "gateway ledger loaded"
        );
        store.ledger = Some(ledger);
        Ok(store)
    }

    /// Applies one ledger line to the tables.
    fn replay(&mut self, e: &LedgerEntry, oldest: u64, now_ms: u64) -> anyhow::Result<()> {
        if e.replay || e.outcome == LedgerOutcome::Failed {
            return Ok(());
        }
        let at = e.at.unwrap_or(now_ms) / 1000;
        let fingerprint = match &e.params {
            Some(hex) => u64::from_str_radix(hex, 16).context("unreadable params digest")?,
            None => anyhow::bail!("a line without a params digest (written by an older build)"),
        };
        let id = e.id.as_deref();
        // The intent the line is about: named apart (a refund, confirm, cancel or decline), or
        // the ID of the intent a create made.
        let target = match (e.intent.as_deref(), id) {
            (Some(named), _) => {
                Some(model::parse_intent_id(named).context("unreadable intent ID")?)
            }
            (None, Some(id))
                if matches!(
                    e.op,
                    LedgerOp::Charge | LedgerOp::Create | LedgerOp::Authorize | LedgerOp::Process
                ) =>
            {
                Some(model::parse_intent_id(id).context("unreadable intent ID")?)
            }
            _ => None,
        };
        let Some(target) = target else {
            // Refused before an intent was named (a key reused or in use).
            anyhow::ensure!(
                e.outcome == LedgerOutcome::Rejected,
                "a call without its intent"
            );
            return Ok(());
        };
        let mut intent = match self.get(&target) {
            Some(intent) => intent,
            None if matches!(
                e.op,
                LedgerOp::Charge | LedgerOp::Create | LedgerOp::Authorize | LedgerOp::Process
            ) && e.outcome != LedgerOutcome::Rejected =>
            {
                let metadata = Metadata::new(vec![("payment_id".into(), e.payment_id.clone())]);
                Intent {
                    id: target,
                    amount: e.amount,
                    currency: Currency::parse("usd").expect("a currency"),
                    status: IntentStatus::RequiresConfirmation,
                    payment_method: None,
                    metadata,
                    created: at,
                    canceled_at: None,
                    declined: false,
                    refunds: Vec::new(),
                    capture_manual: e.op == LedgerOp::Authorize || e.manual_capture,
                    amount_captured: None,
                    settles_at: None,
                }
            }
            // A call for an intent that was never there (404): nothing to rebuild.
            None if e.outcome == LedgerOutcome::Rejected => return Ok(()),
            None => anyhow::bail!("a call for an unknown intent"),
        };
        let (kind, n) = match (e.op, e.outcome) {
            (LedgerOp::Create, LedgerOutcome::Succeeded) => (AnswerKind::Intent, 0),
            (LedgerOp::Process, LedgerOutcome::Succeeded) => {
                intent.status = match e.settles_at {
                    Some(_) => IntentStatus::Processing,
                    None => IntentStatus::RequiresAction,
                };
                intent.settles_at = e.settles_at;
                intent.declined = false;
                (AnswerKind::Intent, intent.refunds.len())
            }
            (LedgerOp::Charge, LedgerOutcome::Succeeded) => {
                intent.status = IntentStatus::Succeeded;
                intent.settles_at = None;
                intent.declined = false;
                (AnswerKind::Intent, intent.refunds.len())
            }
            (LedgerOp::Authorize, LedgerOutcome::Succeeded) => {
                intent.capture_manual = true;
                intent.status = IntentStatus::RequiresCapture;
                intent.settles_at = None;
                intent.declined = false;
                (AnswerKind::Intent, intent.refunds.len())
            }
            (LedgerOp::Capture, LedgerOutcome::Succeeded) => {
                intent.status = IntentStatus::Succeeded;
                intent.amount_captured = (e.amount < intent.amount).then_some(e.amount);
                (AnswerKind::Intent, intent.refunds.len())
            }
            (LedgerOp::Charge | LedgerOp::Authorize, LedgerOutcome::Declined) => {
                intent.status = IntentStatus::RequiresPaymentMethod;
                intent.settles_at = None;
                intent.declined = true;
                (AnswerKind::Declined, intent.refunds.len())
            }
            (LedgerOp::Cancel, LedgerOutcome::Succeeded) => {
                intent.status = IntentStatus::Canceled;
                intent.canceled_at = Some(at);
                (AnswerKind::Intent, intent.refunds.len())
            }
            (LedgerOp::Refund, LedgerOutcome::Succeeded) => {
                let (_, n) = id
                    .and_then(model::parse_refund_id)
                    .context("a refund without a readable ID")?;
                anyhow::ensure!(
                    usize::from(n) == intent.refunds.len(),
                    "refund {n} out of order"
                );
                intent.refunds.push(Refund {
                    amount: e.amount,
                    created: at,
                    metadata: Metadata::new(vec![
                        ("idempotency_key".into(), e.idempotency_key.clone()),
                        ("payment_id".into(), e.payment_id.clone()),
                    ]),
                });
                (AnswerKind::Refund, intent.refunds.len() - 1)
            }
            (_, LedgerOutcome::Rejected) => match e.error.as_deref() {
                Some("amount_too_large" | "charge_already_refunded") => {
                    (AnswerKind::RefundTooLarge, intent.refunds.len())
                }
                Some("payment_intent_unexpected_state") => {
                    (AnswerKind::UnexpectedState, intent.refunds.len())
                }
                // Refused without keeping a result (a key reused or in use, a missing intent).
                _ => return Ok(()),
            },
            (op, outcome) => anyhow::bail!("no {op:?} ends {outcome:?}"),
        };
        let rec = KeyRecord {
            fingerprint,
            at: at as u32,
            kind,
            status: intent.status,
            n: u16::try_from(n).unwrap_or(u16::MAX),
            intent: intent.id,
        };
        let key = (!e.idempotency_key.is_empty() && at >= oldest)
            .then_some((e.idempotency_key.as_str(), rec));
        self.apply(key, Some(&intent));
        Ok(())
    }

    fn get(&mut self, id: &Uuid) -> Option<Intent> {
        let shard = uuid_shard(id);
        if let Some(slim) = self.slim.shard(shard).get(id).copied() {
            return Some(self.expand(id, slim));
        }
        self.full.shard(shard).get(id).cloned()
    }

    /// The whole intent a slim record stands for, with its refunds.
    fn expand(&mut self, id: &Uuid, slim: Slim) -> Intent {
        let refunds = match self.refunds.shard(uuid_shard(id)).get(id) {
            None => Vec::new(),
            Some(refunds) => refunds
                .iter()
                .map(|r| Refund {
                    amount: r.amount,
                    created: u64::from(r.created),
                    metadata: Metadata::new(vec![(
                        "idempotency_key".into(),
                        r.key.as_ref().into(),
                    )]),
                })
                .collect(),
        };
        Intent {
            id: *id,
            amount: slim.amount,
            currency: slim.currency,
            status: IntentStatus::Succeeded,
            payment_method: slim
                .method
                .checked_sub(1)
                .map(|n| self.methods[usize::from(n)].clone()),
            metadata: Metadata::default(),
            created: u64::from(slim.created),
            canceled_at: None,
            declined: false,
            refunds,
            capture_manual: false,
            amount_captured: None,
            settles_at: None,
        }
    }

    /// `intent` as a slim record and its refunds, if it can be one.
    fn slim_of(&mut self, intent: &Intent) -> Option<(Slim, Vec<SlimRefund>)> {
        if intent.status != IntentStatus::Succeeded
            || intent.declined
            || intent.canceled_at.is_some()
            || intent.capture_manual
        {
            return None;
        }
        let created = u32::try_from(intent.created).ok()?;
        let refunds = intent
            .refunds
            .iter()
            .map(|r| {
                Some(SlimRefund {
                    amount: r.amount,
                    created: u32::try_from(r.created).ok()?,
                    key: r.metadata.get("idempotency_key").unwrap_or_default().into(),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let method = match intent.payment_method.as_deref() {
            None => 0,
            Some(pm) => match self.methods.iter().position(|m| &**m == pm) {
                Some(n) => u8::try_from(n + 1).ok()?,
                None if self.methods.len() < usize::from(u8::MAX) => {
                    self.methods.push(pm.into());
                    self.methods.len() as u8
                }
                None => return None,
            },
        };
        let slim = Slim {
            amount: intent.amount,
            created,
            currency: intent.currency,
            method,
        };
        Some((slim, refunds))
    }

    fn apply(&mut self, key: Option<(&str, KeyRecord)>, intent: Option<&Intent>) {
        if let Some((key, rec)) = key {
            let d = self.digest.of(key);
            self.keys.shard(low(d)).insert(d, rec);
        }
        if let Some(intent) = intent {
            let shard = uuid_shard(&intent.id);
            let was_slim = self.slim.shard(shard).remove(&intent.id).is_some();
            let was_full = match self.slim_of(intent) {
                Some((slim, refunds)) => {
                    self.slim.shard(shard).insert(intent.id, slim);
                    if refunds.is_empty() {
                        self.refunds.shard(shard).remove(&intent.id);
                    } else {
                        self.refunds.shard(shard).insert(intent.id, refunds);
                    }
                    self.full.shard(shard).remove(&intent.id).is_some()
                }
                None => {
                    self.refunds.shard(shard).remove(&intent.id);
                    self.full
                        .shard(shard)
                        .insert(intent.id, intent.clone())
                        .is_some()
                }
            };
            if !was_slim && !was_full {
                let d = self.digest.of(intent.metadata.payment_id());
                let first = self.by_payment.shard(low(d));
                match first.entry(d) {
                    Entry::Vacant(e) => {
                        e.insert(intent.id);
                    }
                    Entry::Occupied(_) => self.more.entry(d).or_default().push(intent.id),
                }
            }
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Store for MemoryStore {
    fn blocks(&self) -> bool {
        self.ledger.is_some()
    }

    fn records(&self) -> bool {
        self.ledger.is_some()
    }

    fn key(&mut self, key: &str) -> anyhow::Result<Option<KeyRecord>> {
        let d = self.digest.of(key);
        Ok(self.keys.shard(low(d)).get(&d).copied())
    }

    fn intent(&mut self, id: &Uuid) -> anyhow::Result<Option<Intent>> {
        Ok(self.get(id))
    }

    fn search(&mut self, payment_id: &str) -> anyhow::Result<Vec<Intent>> {
        let d = self.digest.of(payment_id);
        let mut ids: Vec<Uuid> = self
            .by_payment
            .shard(low(d))
            .get(&d)
            .copied()
            .into_iter()
            .collect();
        ids.extend(self.more.get(&d).into_iter().flatten());
        Ok(ids.iter().filter_map(|id| self.get(id)).collect())
    }

    fn commit(&mut self, commit: Commit<'_>) -> anyhow::Result<()> {
        // Not recorded means not done: the caller gets no answer and retries with the key.
        if let (Some(ledger), Some(line)) = (&mut self.ledger, commit.line) {
            ledger.append(line)?;
        }
        self.apply(commit.key, commit.intent);
        Ok(())
    }

    fn forget_keys_before(&mut self, at: u32) -> anyhow::Result<usize> {
        let before = self.keys.len();
        for shard in &mut self.keys.0 {
            shard.retain(|_, rec| rec.at >= at);
        }
        Ok(before - self.keys.len())
    }

    fn settling(&mut self) -> anyhow::Result<Vec<Intent>> {
        // Never slim: only a succeeded intent is.
        Ok(self
            .full
            .0
            .iter()
            .flat_map(HashMap::values)
            .filter(|i| i.settles_at.is_some())
            .cloned()
            .collect())
    }
}
