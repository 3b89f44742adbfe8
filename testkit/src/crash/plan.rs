//! The crash test's plan: the load and the kills, all drawn from the seed. Plain data, so that
//! a seed replays the same schedule (interleavings stay up to the machine).

use std::collections::BTreeSet;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::client::{CANCEL, CAPTURE};

/// What a run is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub full: bool,
    /// Restate nodes: 1, or 3 for a cluster.
    pub nodes: usize,
    pub seed: u64,
    pub payments: usize,
    /// How long the kills go on.
    pub duration: Duration,
    /// restate-server kills (on a cluster: node kills, one node at a time).
    pub server_kills: usize,
    /// The gateway's delay between acting and answering, where a kill cuts the answer off.
    pub response_delay_ms: u64,
    pub recovery_timeout: Duration,
    /// Fault injection: the gateway acts on every call as if its key were new; the run must
    /// then fail.
    pub ignore_keys: bool,
    /// The gateway as a process of its own (`mock-gateway`, the service with `--gateway
    /// stripe`), with the faults below on top of the kills.
    pub gateway_process: bool,
    pub gateway: GatewayFaults,
}

/// The gateway process's faults, drawn from the seed (the calls they hit are drawn by the
/// gateway itself, at random: a seed replays the rates and the kills, not which calls).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GatewayFaults {
    /// SIGKILLs of `mock-gateway` (started again on its database after `down_for`).
    pub kills: usize,
    /// Share of calls answered 500 or 429 before the gateway acts.
    pub error_rate: f64,
    /// Share of calls acted on and recorded whose answer is lost (the connection closed).
    pub drop_response_rate: f64,
    /// Share of calls never answered (the service's attempt timeout ends them).
    pub hang_rate: f64,
}

impl GatewayFaults {
    /// None at all (the in-process gateway).
    pub const NONE: Self = Self {
        kills: 0,
        error_rate: 0.0,
        drop_response_rate: 0.0,
        hang_rate: 0.0,
    };

    pub fn any(&self) -> bool {
        self.kills > 0 || self.error_rate + self.drop_response_rate + self.hang_rate > 0.0
    }
}

/// The service's settings with the gateway process: attempts that end within a second and
/// settle rounds every few seconds at most, so that every unknown outcome is settled well
/// within the run's recovery timeout.
pub const GATEWAY_PROCESS_SERVICE_ENV: [(&str, &str); 4] = [
    ("GATEWAY_ATTEMPT_TIMEOUT", "1s"),
    ("GATEWAY_ATTEMPTS", "3"),
    ("SETTLE_FIRST_DELAY", "250ms"),
    ("SETTLE_MAX_DELAY", "2s"),
];

/// The service's hold window in a run: holds the plan leaves alone are released by the
/// service within the run; a capture sent late meets the release (and is refused).
pub const HOLD_EXPIRY: &str = "3s";

/// The service's confirmation deadline in a run: a charge still waiting on its customer then
/// is cancelled within the run.
pub const CONFIRM_DEADLINE: &str = "2s";
/// How long the mock gateway's processing charges take to settle.
pub const SETTLE_DELAY: Duration = Duration::from_secs(1);
/// The webhook secret of a run with the gateway process.
pub const WEBHOOK_SECRET: &str = "whsec_crash_test";

/// The mock gateway's delay before it acts.
pub const GATEWAY_DELAY_MS: u64 = 20;
/// The seed's decline rate.
pub const DECLINE_RATE: f64 = 0.1;

impl Params {
    /// The defaults of a run: small (CI) or full, on one node or three.
    pub fn new(full: bool, nodes: usize, seed: u64) -> Self {
        let (payments, duration, server_kills, recovery) = match (full, nodes > 1) {
            (true, false) => (240, 20.0, 2, 180.0),
            (false, false) => (60, 8.0, 1, 90.0),
            // Node restarts take longer than a single server's (a node catches up with the
            // others before it serves): a longer window keeps the load running across them.
            (true, true) => (240, 30.0, 3, 240.0),
            (false, true) => (40, 8.0, 1, 150.0),
        };
        let mut schedule = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        Self {
            full,
            nodes,
            seed,
            payments,
            duration: Duration::from_secs_f64(duration),
            server_kills,
            response_delay_ms: schedule.random_range(50..=150),
            recovery_timeout: Duration::from_secs_f64(recovery),
            ignore_keys: false,
            gateway_process: false,
            gateway: GatewayFaults::NONE,
        }
    }

    /// The same run with the gateway as a process: its kills and fault rates from the seed
    /// (an RNG of their own: the payments and the other kills stay those of the seed), no
    /// response delay (`mock-gateway` loses answers by `drop_response_rate` instead).
    pub fn with_gateway_process(mut self) -> Self {
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x5851_f42d_4c95_7f2d);
        self.gateway_process = true;
        self.response_delay_ms = 0;
        self.gateway = GatewayFaults {
            kills: if self.full { 2 } else { 1 },
            error_rate: round3(rng.random_range(0.01..0.04)),
            drop_response_rate: round3(rng.random_range(0.03..0.08)),
            hang_rate: round3(rng.random_range(0.01..0.03)),
        };
        self
    }

    pub fn cluster(&self) -> bool {
        self.nodes > 1
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One payment's clients.
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentPlan {
    pub id: String,
    pub amount: u64,
    pub customer: String,
    /// Concurrent CreatePayment calls (the first plus duplicates).
    pub creates: usize,
    /// When the first CreatePayment goes out, from the start of the load.
    pub start: Duration,
    /// Concurrent RefundPayment calls after the payment was answered: the `amount` each asks
    /// for (`None`: no amount field, a full refund; `Some(0)`: full too). Empty: no refund.
    pub refunds: Vec<Option<u64>>,
    /// Pause between the CreatePayment answer and the refunds.
    pub refund_pause: Duration,
    /// Refunds in parts, with refund keys, all sent at once after the pause (only for a plan
    /// without `refunds`): together they may ask for more than the payment, and then some
    /// are refused.
    pub keyed_refunds: Vec<KeyedRefund>,
    /// A hold (`"capture": "manual"`, only for a plan without refunds): what its clients do
    /// once it is authorized, after the pause.
    pub hold: Option<HoldPlan>,
    /// The ingress each client call goes to first (a node index): the CreatePayment calls,
    /// then the RefundPayment calls, then the hold's calls, then the GetPayment.
    pub ingresses: Vec<usize>,
}

/// What the clients of a hold do with it: `copies` concurrent calls.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldPlan {
    pub end: HoldEnd,
    pub copies: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HoldEnd {
    /// CapturePayment of this amount (`None`: the whole hold).
    Capture(Option<u64>),
    CancelPayment,
    /// Captures and cancels at once, alternating: exactly one of them may win.
    Race(Option<u64>),
    /// Nothing: the service releases the hold when its window ends (`HOLD_EXPIRY`).
    Expire,
}

impl HoldPlan {
    /// The handler of the hold's call `k`, and the capture's amount.
    pub fn call(&self, k: usize) -> (&'static str, Option<u64>) {
        match self.end {
            HoldEnd::Capture(amount) => (CAPTURE, amount),
            HoldEnd::Race(amount) if k.is_multiple_of(2) => (CAPTURE, amount),
            HoldEnd::CancelPayment | HoldEnd::Race(_) => (CANCEL, None),
            HoldEnd::Expire => unreachable!("an expiring hold has no calls"),
        }
    }

    pub fn calls(&self) -> usize {
        if self.end == HoldEnd::Expire {
            0
        } else {
            self.copies
        }
    }
}

/// A refund with a refund key: `copies` concurrent requests with the same key and amount.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyedRefund {
    pub key: String,
    /// `None`: all that is left.
    pub amount: Option<u64>,
    pub copies: usize,
}

impl PaymentPlan {
    /// Whether the gateway settles this plan's charge later (its customer pays later).
    pub fn is_async(&self) -> bool {
        self.customer.starts_with("async-") || self.customer.starts_with("action-")
    }

    /// The RefundPayment calls of this plan: the refunds, then each keyed refund's copies.
    pub fn refund_calls(&self) -> usize {
        self.refunds.len() + self.keyed_refunds.iter().map(|k| k.copies).sum::<usize>()
    }

    /// The CapturePayment and CancelPayment calls of this plan.
    pub fn hold_calls(&self) -> usize {
        self.hold.as_ref().map_or(0, HoldPlan::calls)
    }

    /// The refund amounts this plan may legitimately end with.
    pub fn refund_amounts(&self) -> BTreeSet<u64> {
        self.refunds
            .iter()
            .map(|a| match a {
                None | Some(0) => self.amount,
                Some(a) => *a,
            })
            .collect()
    }

    /// The ingress of client call `k` (see `ingresses`).
    pub fn ingress(&self, k: usize) -> usize {
        self.ingresses.get(k).copied().unwrap_or(0)
    }
}

/// The payments of a run, in order.
pub fn payments(p: &Params) -> Vec<PaymentPlan> {
    let mut rng = StdRng::seed_from_u64(p.seed);
    // Payments start during most of the kill window, so that kills land on all of them.
    let window = p.duration.mul_f64(0.85);
    let mut plans: Vec<PaymentPlan> = (0..p.payments)
        .map(|i| {
            let amount = rng.random_range(100..=50_000_u64);
            let customer = if rng.random_bool(0.06) {
                format!("decline-cust-{i}")
            } else {
                format!("cust-{}", rng.random_range(0..50))
            };
            let creates = rng.random_range(2..=3);
            let start = window.mul_f64(rng.random::<f64>());
            let refunds = if rng.random_bool(0.45) {
                refund_amounts(&mut rng, amount)
            } else {
                Vec::new()
            };
            PaymentPlan {
                id: format!("crash-{i:04}"),
                amount,
                customer,
                creates,
                start,
                refunds,
                refund_pause: Duration::from_millis(rng.random_range(0..400)),
                keyed_refunds: Vec::new(),
                hold: None,
                ingresses: Vec::new(),
            }
        })
        .collect();
    // From an RNG of its own, so that the rest of a seed's plans is what it was before keyed
    // refunds: about a quarter of the payments without a refund get refunds in parts.
    let mut keyed_rng = StdRng::seed_from_u64(p.seed ^ 0x5bd1_e995_c6a4_a793);
    for plan in &mut plans {
        if plan.refunds.is_empty() && keyed_rng.random_bool(0.25) {
            plan.keyed_refunds = keyed_refunds(&mut keyed_rng, plan.amount);
        }
    }
    // Holds, from an RNG of their own too: two fifths of the payments left without refunds.
    let mut hold_rng = StdRng::seed_from_u64(p.seed ^ 0x2545_f491_4f6c_dd1d);
    for plan in &mut plans {
        if plan.refund_calls() == 0 && hold_rng.random_bool(0.4) {
            plan.hold = Some(hold(&mut hold_rng, plan.amount));
        }
    }
    // Payments that settle later, from an RNG of their own: an eighth of those not declined
    // pay as a bank debit does (processing, then succeeded, or now and then declined), or
    // wait on a customer who never confirms (cancelled at the deadline).
    let mut async_rng = StdRng::seed_from_u64(p.seed ^ 0x7f4a_7c15_9e37_79b9);
    for (i, plan) in plans.iter_mut().enumerate() {
        if !plan.customer.starts_with("decline-") && async_rng.random_bool(0.125) {
            plan.customer = match async_rng.random_range(0..6) {
                0 => format!("async-decline-cust-{i}"),
                1 => format!("action-cust-{i}"),
                _ => format!("async-cust-{i}"),
            };
        }
    }
    // From an RNG of their own: the plans of a seed are the same on one node and on three.
    let mut ingress_rng = StdRng::seed_from_u64(p.seed ^ 0x1656_67b1_9e37_79f9);
    for plan in &mut plans {
        let calls = plan.creates + plan.refund_calls() + plan.hold_calls() + 1;
        plan.ingresses = (0..calls)
            .map(|_| ingress_rng.random_range(0..p.nodes))
            .collect();
    }
    plans
}

/// A hold's end: captured (in full or in part), cancelled, both at once, or left to expire.
fn hold(rng: &mut StdRng, amount: u64) -> HoldPlan {
    let capture = if rng.random_bool(0.5) {
        None
    } else {
        Some(rng.random_range(1..=amount))
    };
    let end = match rng.random_range(0..10) {
        0..=3 => HoldEnd::Capture(capture),
        4..=5 => HoldEnd::CancelPayment,
        6..=7 => HoldEnd::Race(capture),
        _ => HoldEnd::Expire,
    };
    let copies = match end {
        HoldEnd::Race(_) => rng.random_range(2..=4),
        _ => rng.random_range(1..=2),
    };
    HoldPlan { end, copies }
}

/// One or two refund requests: mostly the same request twice; sometimes another amount, of
/// which the first to run wins and the other gets the same refund back.
fn refund_amounts(rng: &mut StdRng, amount: u64) -> Vec<Option<u64>> {
    let copies = rng.random_range(1..=2);
    let partial = amount > 1 && rng.random_bool(0.4);
    let first = if partial {
        Some(rng.random_range(1..amount))
    } else {
        [None, Some(0), Some(amount)][rng.random_range(0..3)]
    };
    let mut amounts = vec![first];
    if copies == 2 {
        amounts.push(if rng.random_bool(0.75) {
            first
        } else if partial {
            None
        } else {
            Some(rng.random_range(1..=amount))
        });
    }
    amounts
}

/// Two or three refunds in parts, each up to half the payment, the last sometimes of all that
/// is left; each sent once or twice. Their total may exceed the payment.
fn keyed_refunds(rng: &mut StdRng, amount: u64) -> Vec<KeyedRefund> {
    let parts = rng.random_range(2..=3);
    (0..parts)
        .map(|k| KeyedRefund {
            key: format!("part-{k}"),
            amount: if k + 1 == parts && rng.random_bool(0.3) {
                None
            } else {
                Some(rng.random_range(1..=(amount / 2).max(1)))
            },
            copies: rng.random_range(1..=2),
        })
        .collect()
}

/// What a kill hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Service,
    /// The gateway process (`mock-gateway`).
    Gateway,
    /// A Restate node (index; the only one on a single server).
    Node(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kill {
    pub at: Duration,
    pub target: Target,
    /// How long it stays down before it is started again.
    pub down_for: Duration,
}

/// The kills of a run, in time order: the service every 1-2 s, and `server_kills` Restate
/// kills spread over the window (on a cluster each node before any twice, never one node
/// twice in a row).
pub fn kills(p: &Params) -> Vec<Kill> {
    let mut rng = StdRng::seed_from_u64(p.seed ^ 0xc2b2_ae3d_27d4_eb4f);
    let secs = p.duration.as_secs_f64();
    let mut kills = Vec::new();
    let mut at = rng.random_range(1.0..2.0);
    while at < secs {
        kills.push(Kill {
            at: Duration::from_secs_f64(at),
            target: Target::Service,
            down_for: Duration::from_millis(rng.random_range(0..300)),
        });
        at += rng.random_range(1.0..2.0);
    }
    if kills.is_empty() {
        kills.push(Kill {
            at: p.duration.mul_f64(0.5),
            target: Target::Service,
            down_for: Duration::ZERO,
        });
    }
    // No draw from the RNG on one node: a seed replays the same single-server schedule.
    let mut order: Vec<usize> = (0..p.nodes).collect();
    if p.cluster() {
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
    }
    let n = p.server_kills;
    for k in 0..n {
        // Spread over the window, off the service kills' beat.
        let centre = secs * (k as f64 + 1.0) / (n as f64 + 1.0);
        let at = (centre + rng.random_range(-0.4..0.4)).clamp(0.5, secs.max(0.5));
        // A node stays down long enough for the others to take over its partitions.
        let down_ms = if p.cluster() {
            rng.random_range(500..3000)
        } else {
            rng.random_range(0..1000)
        };
        kills.push(Kill {
            at: Duration::from_secs_f64(at),
            target: Target::Node(order[k % order.len()]),
            down_for: Duration::from_millis(down_ms),
        });
    }
    // The gateway's kills from an RNG of their own: the others stay those of the seed.
    let mut gw = StdRng::seed_from_u64(p.seed ^ 0x2545_f491_4f6c_dd1d);
    let n = p.gateway.kills;
    for k in 0..n {
        let centre = secs * (k as f64 + 0.5) / n as f64;
        let at = (centre + gw.random_range(-0.5..0.5)).clamp(0.5, secs.max(0.5));
        kills.push(Kill {
            at: Duration::from_secs_f64(at),
            target: Target::Gateway,
            // Long enough for charges to run out of attempts: payments left pending.
            down_for: Duration::from_millis(gw.random_range(1500..4000)),
        });
    }
    kills.sort_by_key(|k| k.at);
    kills
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_plan() {
        let p = Params::new(true, 1, 42);
        assert_eq!(payments(&p), payments(&p));
        assert_eq!(kills(&p), kills(&p));
        assert_ne!(payments(&p), payments(&Params::new(true, 1, 43)));
    }

    #[test]
    fn the_payments_of_a_seed_are_the_same_on_one_node_and_on_three() {
        let one = Params::new(true, 1, 7);
        // Start times scale with the window, which is longer by default on a cluster.
        let three = Params {
            duration: one.duration,
            ..Params::new(true, 3, 7)
        };
        let strip = |mut plans: Vec<PaymentPlan>| {
            plans.iter_mut().for_each(|p| p.ingresses.clear());
            plans
        };
        assert!(strip(payments(&one)) == strip(payments(&three)));
        assert!(
            payments(&one)
                .iter()
                .all(|p| p.ingresses.iter().all(|&i| i == 0))
        );
    }

    #[test]
    fn cluster_kills_take_each_node_before_any_twice() {
        for seed in 0..50 {
            let p = Params {
                server_kills: 6,
                ..Params::new(true, 3, seed)
            };
            let nodes: Vec<usize> = kills(&p)
                .iter()
                .filter_map(|k| match k.target {
                    Target::Node(i) => Some(i),
                    Target::Service | Target::Gateway => None,
                })
                .collect();
            assert_eq!(nodes.len(), 6);
            let first: BTreeSet<usize> = nodes[..3].iter().copied().collect();
            assert_eq!(first.len(), 3, "seed {seed}: {nodes:?}");
            assert!(
                nodes.windows(2).all(|w| w[0] != w[1]),
                "seed {seed}: {nodes:?}"
            );
        }
    }

    #[test]
    fn the_gateway_process_adds_its_faults_and_leaves_the_rest_of_the_seed_alone() {
        let p = Params::new(true, 1, 11);
        let g = p.clone().with_gateway_process();
        assert_eq!(payments(&p), payments(&g));
        let without_gateway: Vec<Kill> = kills(&g)
            .into_iter()
            .filter(|k| k.target != Target::Gateway)
            .collect();
        assert_eq!(kills(&p), without_gateway);
        let gateway = kills(&g).len() - without_gateway.len();
        assert_eq!(gateway, 2);
        assert!(g.gateway.any() && !p.gateway.any());
        assert!(g.gateway.drop_response_rate > 0.0 && g.gateway.hang_rate > 0.0);
        assert_eq!(
            g,
            p.clone().with_gateway_process(),
            "a seed replays its faults"
        );
    }

    #[test]
    fn the_service_is_killed_through_the_whole_window() {
        let p = Params::new(false, 1, 3);
        let service: Vec<Duration> = kills(&p)
            .iter()
            .filter(|k| k.target == Target::Service)
            .map(|k| k.at)
            .collect();
        assert!(service.len() >= 3, "{service:?}");
        assert!(
            service
                .windows(2)
                .all(|w| w[1] - w[0] <= Duration::from_secs(2))
        );
    }
}
