//! The gateway's audit ledger lives with the simulated gateway that writes it
//! ([`crate::stripe_sim::ledger`]); re-exported here for readers of [`crate::gateway`].

pub use crate::stripe_sim::ledger::{
    LedgerEntry, LedgerOp, LedgerOutcome, LedgerRead, read_ledger,
};
