//! The gateway's audit ledger as the harness reads it: the service's own entry type and
//! reader ([`payment_service::gateway::read_ledger`]: read-only, tolerant of a torn last line),
//! and an index by payment.

use std::collections::HashMap;
use std::path::Path;

pub use payment_service::gateway::{LedgerEntry, LedgerOp, LedgerOutcome, LedgerRead, read_ledger};
pub use payment_service::stripe_sim::LedgerFault;

/// The entries of one payment, in ledger order.
pub fn of_payment(path: &Path, payment_id: &str) -> anyhow::Result<Vec<LedgerEntry>> {
    Ok(read_ledger(path)?
        .entries
        .into_iter()
        .filter(|e| e.payment_id == payment_id)
        .collect())
}

/// Entries grouped by payment ID.
pub fn by_payment(entries: &[LedgerEntry]) -> HashMap<&str, Vec<&LedgerEntry>> {
    let mut map: HashMap<&str, Vec<&LedgerEntry>> = HashMap::new();
    for e in entries {
        map.entry(e.payment_id.as_str()).or_default().push(e);
    }
    map
}
