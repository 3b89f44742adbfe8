//! The in-process mock gateway: the [`PaymentGateway`] trait over the simulated Stripe
//! ([`crate::stripe_sim`]), with no HTTP in between, mapped exactly as the Stripe adapter maps
//! it (docs/stripe-subset: charge = create and confirm under the key; void = the key claimed by
//! an unconfirmed create, then a cancel, or a refund). Its state is in memory, made durable by
//! replaying its ledger at start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    CaptureRequest, CaptureResponse, ChargeLookup, ChargeRequest, ChargeResponse, GatewayError,
    PaymentGateway, RefundRequest, RefundResponse, VoidHoldRequest, VoidRequest, VoidResponse,
    void_charged,
};
use crate::stripe_sim::{
    Body, CreateIntent, CreateRefund, Currency, DEFAULT_KEY_RETENTION, DEFAULT_SETTLE_DELAY,
    Engine, Faults, Intent, IntentStatus, LedgerFault, MemoryStore, Metadata, Post, Reply,
    SimConfig,
};

pub use crate::stripe_sim::DECLINE_CUSTOMER_PREFIX;
/// The reason the mock gives for a decline, as the seed does (Stripe's `insufficient_funds`).
pub const DECLINE_REASON: &str = "insufficient funds";
/// The payment method charges are confirmed with, as the Stripe adapter's default.
pub const PAYMENT_METHOD: &str = "pm_card_visa";

#[derive(Debug, Clone, PartialEq)]
pub struct MockConfig {
    /// Time the gateway takes before it acts (network and processing), its key in flight.
    pub delay: Duration,
    /// Share of charges declined, from 0 (none) to 1 (all).
    pub decline_rate: f64,
    /// Share of calls that fail transiently, before acting, from 0 to 1: the outcome is
    /// unknown to the caller.
    pub error_rate: f64,
    /// Share of calls acted on and recorded whose answer is then lost (an unknown outcome).
    pub drop_response_rate: f64,
    /// Share of calls never answered, before acting: the caller's timeout ends them.
    pub hang_rate: f64,
    /// Time between acting and answering: where a real network loses answers.
    pub response_delay: Duration,
    /// Where to keep the audit ledger; without one, keys are remembered in memory only.
    pub ledger: Option<PathBuf>,
    /// How long an idempotency key's first answer is kept.
    pub key_retention: Duration,
    /// Fault injection, never for production: act on every call as if its key were new.
    /// The crash test switches this on once to show that it then finds double charges.
    pub ignore_idempotency_keys: bool,
    /// How long a processing charge (customers `async-*`) takes to settle by itself. In process
    /// there is no webhook: the service learns of it at its confirmation deadline's look-up.
    pub settle_delay: Duration,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(100),
            decline_rate: 0.1,
            error_rate: 0.0,
            drop_response_rate: 0.0,
            hang_rate: 0.0,
            response_delay: Duration::ZERO,
            ledger: None,
            key_retention: DEFAULT_KEY_RETENTION,
            ignore_idempotency_keys: false,
            settle_delay: DEFAULT_SETTLE_DELAY,
        }
    }
}

impl MockConfig {
    fn faults(&self) -> Faults {
        Faults {
            error_rate: self.error_rate,
            drop_response_rate: self.drop_response_rate,
            hang_rate: self.hang_rate,
        }
    }
}

/// The simulated gateway, in process. Cheap to clone; clones share one engine.
#[derive(Debug, Clone)]
pub struct MockGateway {
    config: MockConfig,
    faults: Faults,
    engine: Arc<Engine<MemoryStore>>,
}

impl MockGateway {
    /// Builds the gateway, replaying the ledger if one is configured.
    pub fn new(config: MockConfig) -> anyhow::Result<Self> {
        let faults = config.faults();
        faults.check()?;
        let sim = SimConfig {
            decline_rate: config.decline_rate,
            key_retention: config.key_retention,
            ignore_idempotency_keys: config.ignore_idempotency_keys,
            settle_delay: config.settle_delay,
        };
        sim.check()?;
        let store = match &config.ledger {
            Some(path) => MemoryStore::open(path, config.key_retention, now_ms())?,
            None => MemoryStore::new(),
        };
        Ok(Self {
            engine: Arc::new(Engine::new(store, sim)?),
            faults,
            config,
        })
    }

    /// Sends one POST as the Stripe adapter would, with the configured faults.
    async fn post(&self, key: &str, payment_id: &str, post: Post) -> Result<Reply, GatewayError> {
        self.settle_due().await?;
        let fault = self.faults.roll();
        match fault {
            // The request is lost on its way: the gateway never sees it.
            Some(LedgerFault::Error) => {
                return Err(GatewayError::Unknown("simulated timeout".into()));
            }
            Some(LedgerFault::Hang) => std::future::pending().await,
            _ => {}
        }
        let dropped = fault == Some(LedgerFault::Drop);
        let reply = self
            .engine
            .post(Some(key.to_owned()), post, self.config.delay, dropped)
            .await
            .map_err(|e| GatewayError::Unknown(format!("{e:#}")))?;
        // Logged once the gateway acted, before the answer travels back (a test kills the
        // service in between).
        tracing::debug!(
            %payment_id,
            key,
            status = reply.status(),
            replay = reply.replay,
            dropped,
            "gateway call"
        );
        if !self.config.response_delay.is_zero() {
            tokio::time::sleep(self.config.response_delay).await;
        }
        if dropped {
            return Err(GatewayError::Unknown("simulated lost answer".into()));
        }
        Ok(reply)
    }

    /// Processing charges settle when they are due; in process, that is checked at each call
    /// rather than by a task of its own (the calls are all that can see them).
    async fn settle_due(&self) -> Result<(), GatewayError> {
        self.engine
            .settle_due()
            .await
            .map(drop)
            .map_err(|e| GatewayError::Unknown(format!("{e:#}")))
    }

    /// What a look-up answers, with the faults a call meets before the gateway acts.
    async fn before_lookup(&self) -> Result<(), GatewayError> {
        self.settle_due().await?;
        match self.faults.roll() {
            Some(LedgerFault::Error) | Some(LedgerFault::Drop) => {
                Err(GatewayError::Unknown("simulated timeout".into()))
            }
            Some(LedgerFault::Hang) => std::future::pending().await,
            None => {
                if !self.config.delay.is_zero() {
                    tokio::time::sleep(self.config.delay).await;
                }
                Ok(())
            }
        }
    }

    fn intent(request: &ChargeRequest, confirm: bool) -> Post {
        Post::CreateIntent(CreateIntent {
            amount: request.amount,
            currency: Currency::parse(&request.currency)
                .unwrap_or_else(|| Currency::parse("xxx").expect("a currency")),
            confirm,
            payment_method: Some(PAYMENT_METHOD.to_owned()),
            payment_method_types: vec!["card".to_owned()],
            metadata: Metadata::new(vec![
                ("customer_id".to_owned(), request.customer_id.clone()),
                ("payment_id".to_owned(), request.payment_id.clone()),
            ]),
            capture_manual: request.manual_capture,
        })
    }
}

fn now_ms() -> u64 {
    (crate::stripe_sim::system_clock())()
}

/// The adapter's reading of an error answer (stripe-subset.md "Errors").
fn error_of(e: &crate::stripe_sim::ApiError) -> GatewayError {
    let what = format!("{} ({}): {}", e.kind, e.code.unwrap_or("-"), e.message);
    match e.status {
        409 | 429 | 401 | 403 | 500.. => GatewayError::Unknown(what),
        _ => GatewayError::Rejected(what),
    }
}

fn lookup_of(i: &Intent) -> ChargeLookup {
    ChargeLookup::of_status(i.id(), i.status.as_str())
}

fn decline_reason(e: &crate::stripe_sim::ApiError) -> String {
    if e.decline_code == Some("insufficient_funds") {
        DECLINE_REASON.to_owned()
    } else {
        e.message.clone()
    }
}

#[async_trait]
impl PaymentGateway for MockGateway {
    async fn charge(&self, request: ChargeRequest) -> Result<ChargeResponse, GatewayError> {
        let post = Self::intent(&request, true);
        let reply = self
            .post(&request.idempotency_key, &request.payment_id, post)
            .await?;
        match reply.body {
            Body::Intent(i) => ChargeResponse::of_status(i.id(), i.status.as_str()),
            Body::Error(e) if e.status == 402 => Ok(ChargeResponse::Declined {
                reason: decline_reason(&e),
            }),
            Body::Error(e) => Err(error_of(&e)),
            Body::Refund(_) => Err(GatewayError::Unknown("a refund answered a charge".into())),
        }
    }

    async fn refund(&self, request: RefundRequest) -> Result<RefundResponse, GatewayError> {
        let post = Post::CreateRefund(CreateRefund {
            payment_intent: request.charge_id.clone(),
            amount: Some(request.amount),
            metadata: Metadata::new(vec![
                (
                    "idempotency_key".to_owned(),
                    request.idempotency_key.clone(),
                ),
                ("payment_id".to_owned(), request.payment_id.clone()),
            ]),
        });
        let reply = self
            .post(&request.idempotency_key, &request.payment_id, post)
            .await?;
        match reply.body {
            Body::Refund(r) => Ok(RefundResponse { refund_id: r.id() }),
            Body::Error(e) => Err(error_of(&e)),
            Body::Intent(_) => Err(GatewayError::Unknown("an intent answered a refund".into())),
        }
    }

    async fn void(&self, request: VoidRequest) -> Result<VoidResponse, GatewayError> {
        let charge = &request.charge;
        // Claim the key with a request that moves no money.
        let claim = self
            .post(
                &charge.idempotency_key,
                &charge.payment_id,
                Self::intent(charge, false),
            )
            .await?;
        match claim.body {
            // Cancelled as a hold is released (canceled already, by an earlier void whose
            // answer was lost, counts).
            Body::Intent(intent) => {
                self.void_hold(VoidHoldRequest {
                    idempotency_key: format!("{}:cancel", charge.idempotency_key),
                    payment_id: charge.payment_id.clone(),
                    charge_id: intent.id(),
                })
                .await?;
                Ok(VoidResponse::NothingCharged)
            }
            // The charge reached the gateway first: what did it do?
            Body::Error(e) if e.kind == "idempotency_error" => {
                let charged = self.charge(charge.clone()).await?;
                void_charged(self, &request, charged).await
            }
            Body::Error(e) => Err(error_of(&e)),
            Body::Refund(_) => Err(GatewayError::Unknown("a refund answered a create".into())),
        }
    }

    async fn capture(&self, request: CaptureRequest) -> Result<CaptureResponse, GatewayError> {
        let post = Post::Capture {
            intent: request.charge_id.clone(),
            amount_to_capture: Some(request.amount),
        };
        let reply = self
            .post(&request.idempotency_key, &request.payment_id, post)
            .await?;
        match reply.body {
            Body::Intent(i) if i.status == IntentStatus::Succeeded => Ok(CaptureResponse {
                amount: i.amount_received(),
            }),
            Body::Intent(i) => Err(GatewayError::Unknown(format!(
                "intent {} is {} after a capture",
                i.id(),
                i.status.as_str()
            ))),
            Body::Error(e) => Err(error_of(&e)),
            Body::Refund(_) => Err(GatewayError::Unknown("a refund answered a capture".into())),
        }
    }

    async fn void_hold(&self, request: VoidHoldRequest) -> Result<(), GatewayError> {
        let post = Post::Cancel {
            intent: request.charge_id.clone(),
        };
        let reply = self
            .post(&request.idempotency_key, &request.payment_id, post)
            .await?;
        match reply.body {
            Body::Intent(_) => Ok(()),
            // Released already, under another key.
            Body::Error(e)
                if e.payment_intent
                    .as_ref()
                    .is_some_and(|i| i.status == IntentStatus::Canceled) =>
            {
                Ok(())
            }
            Body::Error(e) => Err(error_of(&e)),
            Body::Refund(_) => Err(GatewayError::Unknown("a refund answered a cancel".into())),
        }
    }

    async fn find_charge(&self, payment_id: &str) -> Result<ChargeLookup, GatewayError> {
        self.before_lookup().await?;
        let intents = self
            .engine
            .search(payment_id.to_owned())
            .await
            .map_err(|e| GatewayError::Unknown(format!("{e:#}")))?;
        Ok(intents
            .iter()
            .rev()
            .map(lookup_of)
            .min_by_key(ChargeLookup::rank)
            .unwrap_or_else(|| ChargeLookup::NotCharged {
                reason: "no charge for this payment".into(),
            }))
    }

    async fn check_charge(&self, charge_id: &str) -> Result<ChargeLookup, GatewayError> {
        self.before_lookup().await?;
        match self.engine.retrieve(charge_id.to_owned()).await {
            Ok(Some(intent)) => Ok(lookup_of(&intent)),
            Ok(None) => Err(GatewayError::Rejected(format!(
                "no such intent {charge_id}"
            ))),
            Err(e) => Err(GatewayError::Unknown(format!("{e:#}"))),
        }
    }

    async fn find_refund(
        &self,
        request: &RefundRequest,
    ) -> Result<Option<RefundResponse>, GatewayError> {
        self.before_lookup().await?;
        let refunds = self
            .engine
            .refunds(request.charge_id.clone())
            .await
            .map_err(|e| GatewayError::Unknown(format!("{e:#}")))?
            .unwrap_or_default();
        Ok(refunds
            .iter()
            .find(|r| r.metadata.get("idempotency_key") == Some(request.idempotency_key.as_str()))
            .map(|r| RefundResponse { refund_id: r.id() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::{LedgerOp, read_ledger};
    use crate::stripe_sim::new_id;

    fn config(decline_rate: f64) -> MockConfig {
        MockConfig {
            delay: Duration::ZERO,
            decline_rate,
            ..MockConfig::default()
        }
    }

    fn charge(key: &str, customer: &str, amount: u64) -> ChargeRequest {
        ChargeRequest {
            idempotency_key: key.into(),
            payment_id: key.trim_start_matches("charge:").into(),
            amount,
            currency: "USD".into(),
            customer_id: customer.into(),
            manual_capture: false,
        }
    }

    #[tokio::test]
    async fn decline_rate_zero_and_one() {
        let never = MockGateway::new(config(0.0)).unwrap();
        let always = MockGateway::new(config(1.0)).unwrap();
        for i in 0..50 {
            let key = format!("charge:p{i}");
            assert!(matches!(
                never.charge(charge(&key, "cust", 1)).await.unwrap(),
                ChargeResponse::Succeeded { .. }
            ));
            assert_eq!(
                always.charge(charge(&key, "cust", 1)).await.unwrap(),
                ChargeResponse::Declined {
                    reason: "insufficient funds".into()
                }
            );
        }
    }

    /// The intent and what it waits on, of a charge the gateway accepts to settle later.
    async fn accepted(
        gw: &MockGateway,
        request: &ChargeRequest,
    ) -> (String, crate::gateway::Awaiting) {
        match gw.charge(request.clone()).await.unwrap() {
            ChargeResponse::Processing {
                charge_id,
                awaiting,
            } => (charge_id, awaiting),
            other => panic!("a charge accepted to settle later expected, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_charge_that_settles_later_is_processing_then_looked_up_and_voided_as_it_stands() {
        use crate::gateway::{Awaiting, VoidRequest};
        let gw = MockGateway::new(MockConfig {
            settle_delay: Duration::from_millis(200),
            ..config(0.0)
        })
        .unwrap();
        let later = charge("charge:later", "async-ann", 5);
        let (charge_id, awaiting) = accepted(&gw, &later).await;
        assert_eq!(awaiting, Awaiting::Processing);
        let void = |c: &ChargeRequest| VoidRequest {
            charge: c.clone(),
            refund_key: format!("void:{}", c.payment_id),
        };
        // The money on its way cannot be stopped: the void's outcome is unknown until it settles.
        assert!(matches!(
            gw.void(void(&later)).await,
            Err(GatewayError::Unknown(_))
        ));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            gw.check_charge(&charge_id).await.unwrap(),
            ChargeLookup::Charged {
                charge_id: charge_id.clone()
            }
        );
        // The key's replay still says processing; the void finds the charge and refunds it.
        assert!(matches!(
            gw.charge(later.clone()).await.unwrap(),
            ChargeResponse::Processing { .. }
        ));
        assert!(matches!(
            gw.void(void(&later)).await.unwrap(),
            VoidResponse::Refunded { .. }
        ));

        let waiting = charge("charge:waiting", "action-bo", 5);
        let (charge_id, awaiting) = accepted(&gw, &waiting).await;
        assert_eq!(awaiting, Awaiting::RequiresAction);
        assert_eq!(
            gw.void(void(&waiting)).await.unwrap(),
            VoidResponse::NothingCharged
        );
        assert!(matches!(
            gw.check_charge(&charge_id).await.unwrap(),
            ChargeLookup::NotCharged { .. }
        ));
    }

    #[tokio::test]
    async fn decline_customers_are_always_declined() {
        let gw = MockGateway::new(config(0.0)).unwrap();
        let r = gw
            .charge(charge("charge:x", "decline-bob", 5))
            .await
            .unwrap();
        assert!(matches!(r, ChargeResponse::Declined { .. }));
    }

    #[tokio::test]
    async fn a_key_is_charged_once_and_replayed_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let cfg = MockConfig {
            ledger: Some(path.clone()),
            ..config(0.0)
        };
        let gw = MockGateway::new(cfg.clone()).unwrap();
        let first = gw.charge(charge("charge:p1", "cust", 100)).await.unwrap();
        let again = gw.charge(charge("charge:p1", "cust", 100)).await.unwrap();
        assert_eq!(first, again);
        let other = gw.charge(charge("charge:p2", "cust", 100)).await.unwrap();
        assert_ne!(first, other, "charge IDs must be unique");

        // A new gateway over the same ledger (the first one gone: one writer per ledger)
        // remembers the key.
        drop(gw);
        let restarted = MockGateway::new(cfg).unwrap();
        let after = restarted
            .charge(charge("charge:p1", "cust", 100))
            .await
            .unwrap();
        assert_eq!(first, after);

        let entries = read_ledger(&path).unwrap().entries;
        let replays: Vec<bool> = entries.iter().map(|e| e.replay).collect();
        assert_eq!(replays, vec![false, true, false, true]);
        assert!(entries.iter().all(|e| e.op == LedgerOp::Charge));
    }

    #[tokio::test]
    async fn concurrent_calls_with_one_key_act_once() {
        let gw = MockGateway::new(config(0.0)).unwrap();
        let calls = (0..16).map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move { gw.charge(charge("charge:same", "cust", 7)).await })
        });
        let mut ids = std::collections::HashSet::new();
        for call in calls {
            if let ChargeResponse::Succeeded { charge_id } = call.await.unwrap().unwrap() {
                ids.insert(charge_id);
            }
        }
        assert_eq!(ids.len(), 1);
    }

    #[tokio::test]
    async fn a_key_reused_for_another_amount_is_rejected() {
        let gw = MockGateway::new(config(0.0)).unwrap();
        gw.charge(charge("charge:p", "cust", 100)).await.unwrap();
        let err = gw
            .charge(charge("charge:p", "cust", 200))
            .await
            .unwrap_err();
        assert!(matches!(err, GatewayError::Rejected(_)), "{err}");
    }

    #[tokio::test]
    async fn a_void_refunds_a_charge_that_went_through_or_reports_the_refund_refused() {
        let gw = MockGateway::new(config(0.0)).unwrap();
        let void = |key: &str| VoidRequest {
            charge: charge(key, "cust", 300),
            refund_key: format!("void:{key}"),
        };
        let ChargeResponse::Succeeded { charge_id } =
            gw.charge(charge("charge:v1", "cust", 300)).await.unwrap()
        else {
            panic!("declined")
        };
        let refunded = gw.void(void("charge:v1")).await.unwrap();
        assert!(
            matches!(&refunded, VoidResponse::Refunded { charge_id: c, .. } if *c == charge_id),
            "{refunded:?}"
        );
        assert_eq!(
            gw.void(void("charge:v1")).await.unwrap(),
            refunded,
            "a repeat"
        );

        // Refunded already under another key: the gateway refuses the void's refund, for good.
        let ChargeResponse::Succeeded { charge_id } =
            gw.charge(charge("charge:v2", "cust", 300)).await.unwrap()
        else {
            panic!("declined")
        };
        gw.refund(RefundRequest {
            idempotency_key: "refund:elsewhere".into(),
            payment_id: "v2".into(),
            charge_id: charge_id.clone(),
            amount: 300,
        })
        .await
        .unwrap();
        match gw.void(void("charge:v2")).await.unwrap() {
            VoidResponse::RefundRefused {
                charge_id: c,
                reason,
            } => {
                assert_eq!(c, charge_id);
                assert!(reason.contains("charge_already_refunded"), "{reason}");
            }
            other => panic!("expected the refund refused, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn refunds_are_found_by_their_key_and_capped_at_the_charge() {
        let gw = MockGateway::new(config(0.0)).unwrap();
        let ChargeResponse::Succeeded { charge_id } =
            gw.charge(charge("charge:f1", "cust", 500)).await.unwrap()
        else {
            panic!("declined")
        };
        let refund = |key: &str, amount| RefundRequest {
            idempotency_key: key.into(),
            payment_id: "f1".into(),
            charge_id: charge_id.clone(),
            amount,
        };
        let first = gw.refund(refund("refund:f1:r1", 200)).await.unwrap();
        let second = gw.refund(refund("refund:f1:r2", 300)).await.unwrap();
        assert_ne!(first, second);
        for (key, made) in [("refund:f1:r1", &first), ("refund:f1:r2", &second)] {
            assert_eq!(
                gw.find_refund(&refund(key, 0)).await.unwrap().as_ref(),
                Some(made)
            );
        }
        assert_eq!(
            gw.find_refund(&refund("refund:f1:r3", 1)).await.unwrap(),
            None
        );
        let over = gw.refund(refund("refund:f1:r3", 1)).await.unwrap_err();
        assert!(matches!(over, GatewayError::Rejected(_)), "{over}");
        // A repeat of a key answers its refund.
        assert_eq!(gw.refund(refund("refund:f1:r1", 200)).await.unwrap(), first);
    }

    #[tokio::test]
    async fn error_rate_one_always_fails_transiently_without_acting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let gw = MockGateway::new(MockConfig {
            error_rate: 1.0,
            ledger: Some(path.clone()),
            ..config(0.0)
        })
        .unwrap();
        let err = gw.charge(charge("charge:p", "cust", 1)).await.unwrap_err();
        assert!(matches!(err, GatewayError::Unknown(_)));
        assert!(read_ledger(&path).unwrap().entries.is_empty());
    }

    #[tokio::test]
    async fn ignoring_keys_charges_every_call() {
        let gw = MockGateway::new(MockConfig {
            ignore_idempotency_keys: true,
            ..config(0.0)
        })
        .unwrap();
        let first = gw.charge(charge("charge:p", "cust", 1)).await.unwrap();
        let again = gw.charge(charge("charge:p", "cust", 1)).await.unwrap();
        assert_ne!(first, again);
    }

    #[test]
    fn ids_are_random_v4_uuids() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.get_version_num(), 4);
        assert_ne!(a, b);
    }

    #[test]
    fn rates_out_of_range_are_refused() {
        assert!(MockGateway::new(config(1.5)).is_err());
        assert!(MockGateway::new(config(-0.1)).is_err());
    }
}
