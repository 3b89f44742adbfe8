//! Configuration: command-line flags, each with an environment variable.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

use crate::gateway::webhook::WebhookSecret;
use crate::gateway::{
    ApiKey, MockConfig, MockGateway, PaymentGateway, RetryPolicy, StripeConfig, StripeGateway,
    stripe,
};
use crate::service::SettlePolicy;

/// An idempotent payment service on Restate. Serve it, then register it with a Restate server
/// (`POST <admin>/deployments {"uri": "http://<this host>:9090"}`).
#[derive(Debug, Clone, Parser)]
#[command(name = "payment-service", version, about)]
pub struct Config {
    /// Address to listen on for the Restate server (HTTP/2 cleartext). Loopback by default:
    /// any other address needs `--identity-keys` or `--allow-unsigned`.
    #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1:9090")]
    pub bind: SocketAddr,

    /// Serve a non-loopback address without identity keys: every caller that reaches the port
    /// is trusted with everything, the invocation's state included. Only on a network where
    /// Restate is the only other party.
    #[arg(long, env = "ALLOW_UNSIGNED")]
    pub allow_unsigned: bool,

    /// Restate request-identity public keys (`publickeyv1_…`, comma-separated). When set, only
    /// requests signed by a Restate server holding a matching private key are served; others
    /// get 401. Unset, any caller that reaches the port can invoke handlers.
    #[arg(long, env = "IDENTITY_KEYS", value_delimiter = ',')]
    pub identity_keys: Vec<String>,

    /// This build's deployment version, one URL path segment (e.g. `v2` or a commit hash).
    /// When set, the endpoint serves only under `/<version>/`: register it as
    /// `http://<this host>:9090/<version>`, a new Restate deployment per build, and requests
    /// for another build's path get 404 (invocations started on an older build stay there).
    #[arg(long, env = "DEPLOYMENT_VERSION", value_parser = parse_version)]
    pub deployment_version: Option<String>,

    /// Threads that run the handlers and the HTTP/2 connections (tokio workers). One serves
    /// well over a thousand payments a second: the service's own work is ~150 µs of CPU per
    /// payment, the rest is waiting for restate-server. More threads only pay off for CPU-heavy
    /// handlers; each one adds wake-ups between threads.
    #[arg(long, env = "WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: u16,

    /// The most one gateway call may take: one without an answer by then has an unknown
    /// outcome, retried with the same idempotency key.
    #[arg(long, env = "GATEWAY_ATTEMPT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub gateway_attempt_timeout: Duration,

    /// Gateway calls per step (the first included) before an unknown outcome is left pending
    /// and settled later, outside the payment's lock.
    #[arg(long, env = "GATEWAY_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub gateway_attempts: u32,

    /// The pause before the first try to settle an unknown outcome; it doubles, with jitter.
    #[arg(long, env = "SETTLE_FIRST_DELAY", default_value = "1s", value_parser = humantime::parse_duration)]
    pub settle_first_delay: Duration,

    /// The longest pause between two tries to settle an unknown outcome.
    #[arg(long, env = "SETTLE_MAX_DELAY", default_value = "5m", value_parser = humantime::parse_duration)]
    pub settle_max_delay: Duration,

    /// How long the gateway keeps idempotency keys (Stripe: 24 h). Keys are sent again only well
    /// within it; after that an unknown outcome is settled by looking the payment up.
    #[arg(long, env = "GATEWAY_KEY_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub gateway_key_retention: Duration,

    /// How long a hold (`"capture": "manual"`) waits for CapturePayment before the service
    /// releases it: Stripe's card holds last 7 days. E.g. `7d`, `2s`.
    #[arg(long, env = "HOLD_EXPIRY", default_value = "7d", value_parser = parse_hold_expiry)]
    pub hold_expiry: Duration,

    /// How long a charge the gateway accepted without a final word (Stripe's `processing`,
    /// `requires_action`) waits for the gateway's webhook before the service looks it up; one
    /// still waiting on the customer then is cancelled. At least 1s. E.g. `1h`, `2s`.
    #[arg(long, env = "CONFIRM_DEADLINE", default_value = "1h", value_parser = parse_confirm_deadline)]
    pub confirm_deadline: Duration,

    /// Mock gateway: how long a charge of a customer `async-*` takes to settle by itself.
    #[arg(long, env = "GATEWAY_SETTLE_DELAY", default_value = "2s", value_parser = humantime::parse_duration)]
    pub gateway_settle_delay: Duration,

    /// Mock gateway: milliseconds each call takes before the gateway acts.
    #[arg(long, env = "GATEWAY_DELAY_MS", default_value_t = 100)]
    pub gateway_delay_ms: u64,

    /// Mock gateway: share of charges declined, 0 to 1. Customers whose ID starts with
    /// "decline-" are always declined.
    #[arg(long, env = "GATEWAY_DECLINE_RATE", default_value_t = 0.1, value_parser = parse_rate)]
    pub gateway_decline_rate: f64,

    /// Mock gateway: share of calls that fail transiently (a timeout, not a decline), 0 to 1.
    #[arg(long, env = "GATEWAY_ERROR_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub gateway_error_rate: f64,

    /// Mock gateway: share of calls acted on and recorded whose answer is then lost (the
    /// outcome unknown to the service), 0 to 1.
    #[arg(long, env = "GATEWAY_DROP_RESPONSE_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub gateway_drop_response_rate: f64,

    /// Mock gateway: share of calls never answered (before acting), 0 to 1: the service's
    /// per-attempt timeout ends them.
    #[arg(long, env = "GATEWAY_HANG_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub gateway_hang_rate: f64,

    /// Mock gateway: milliseconds between acting and answering, where a network loses answers.
    #[arg(long, env = "GATEWAY_RESPONSE_DELAY_MS", default_value_t = 0)]
    pub gateway_response_delay_ms: u64,

    /// Mock gateway: append-only JSONL audit ledger of every call, reloaded at start so the
    /// gateway remembers idempotency keys across restarts.
    #[arg(long, env = "GATEWAY_LEDGER")]
    pub gateway_ledger: Option<PathBuf>,

    /// Mock gateway, fault injection, never in production: act on every call even when its
    /// idempotency key is known. Only to show what the crash test finds without keys; only in
    /// a build with the `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    #[arg(
        long,
        env = "GATEWAY_UNSAFE_IGNORE_IDEMPOTENCY_KEYS",
        default_value_t = false
    )]
    pub gateway_unsafe_ignore_idempotency_keys: bool,

    /// Which gateway moves the money: `mock`, in this process (the `--gateway-*` flags above),
    /// or `stripe`, Stripe's API (the `--stripe-*` flags below).
    #[arg(long, env = "GATEWAY", value_enum, default_value_t = GatewayKind::Mock)]
    pub gateway: GatewayKind,

    /// Stripe: the secret key (`sk_test_…` for test mode). Required with `--gateway stripe`;
    /// never logged. Prefer the environment variable: a flag shows in the process list.
    #[arg(long, env = "STRIPE_API_KEY", hide_env_values = true)]
    pub stripe_api_key: Option<ApiKey>,

    /// Stripe: the signing secret of the webhook endpoint (`whsec_…`, from the dashboard or
    /// `stripe listen`), for `POST /StripeWebhooks/Receive` through the Restate ingress. Without
    /// it every event is refused. Never logged.
    #[arg(long, env = "STRIPE_WEBHOOK_SECRET", hide_env_values = true, value_parser = parse_webhook_secret)]
    pub stripe_webhook_secret: Option<WebhookSecret>,

    /// Stripe: the API's base URL; another one only for a fake of Stripe in tests.
    #[arg(long, env = "STRIPE_API_BASE", default_value = stripe::DEFAULT_API_BASE)]
    pub stripe_api_base: String,

    /// Stripe: the payment method every charge uses. In test mode e.g. `pm_card_visa`
    /// (succeeds) or `pm_card_visa_chargeDeclinedInsufficientFunds` (declined).
    #[arg(long, env = "STRIPE_PAYMENT_METHOD", default_value = stripe::DEFAULT_PAYMENT_METHOD)]
    pub stripe_payment_method: String,

    /// Stripe: the intents' `allowed_payment_method_types`, comma-separated; empty sends none
    /// (for fakes of older API versions that refuse the parameter, e.g. localstripe).
    #[arg(
        long,
        env = "STRIPE_ALLOWED_PAYMENT_METHOD_TYPES",
        value_delimiter = ',',
        default_value = "card"
    )]
    pub stripe_allowed_payment_method_types: Vec<String>,
}

/// The gateways `--gateway` chooses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GatewayKind {
    Mock,
    Stripe,
}

impl fmt::Display for GatewayKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Mock => "mock",
            Self::Stripe => "stripe",
        })
    }
}

impl Config {
    /// The gateway the flags choose: the one place that reads `--gateway`.
    pub fn gateway(&self) -> anyhow::Result<Arc<dyn PaymentGateway>> {
        Ok(match self.gateway {
            GatewayKind::Mock => Arc::new(
                MockGateway::new(self.mock_gateway()).context("starting the mock gateway")?,
            ),
            GatewayKind::Stripe => Arc::new(
                StripeGateway::new(self.stripe_gateway().map_err(anyhow::Error::msg)?)
                    .context("starting the Stripe gateway")?,
            ),
        })
    }

    /// The Stripe gateway's settings; refused without a key.
    pub fn stripe_gateway(&self) -> Result<StripeConfig, String> {
        let api_key = self.stripe_api_key.clone().ok_or_else(|| {
            "--gateway stripe needs Stripe's secret key: set STRIPE_API_KEY (or pass \
             --stripe-api-key), e.g. a test-mode key sk_test_… from the Stripe dashboard"
                .to_owned()
        })?;
        Ok(StripeConfig {
            api_key,
            api_base: self.stripe_api_base.clone(),
            payment_method: self.stripe_payment_method.clone(),
            allowed_payment_method_types: self
                .stripe_allowed_payment_method_types
                .iter()
                .filter(|t| !t.is_empty())
                .cloned()
                .collect(),
        })
    }

    /// Refuses to start a gateway whose settings are missing (before anything is served).
    pub fn check_gateway(&self) -> Result<(), String> {
        match self.gateway {
            GatewayKind::Mock => Ok(()),
            GatewayKind::Stripe => self.stripe_gateway().map(drop),
        }
    }
}

impl StripeConfig {
    /// The service's command-line flags that give this Stripe gateway: the inverse of
    /// [`Config::stripe_gateway`], for whatever starts the service (the test harness). The
    /// key is among them: for test keys only (a real one belongs in `STRIPE_API_KEY`).
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--gateway=stripe".to_owned(),
            format!("--stripe-api-key={}", self.api_key.expose()),
            format!("--stripe-api-base={}", self.api_base),
            format!("--stripe-payment-method={}", self.payment_method),
            format!(
                "--stripe-allowed-payment-method-types={}",
                self.allowed_payment_method_types.join(",")
            ),
        ]
    }
}

impl Config {
    /// How gateway calls are timed out and retried, in a step and across `Settle` rounds.
    pub fn settle_policy(&self) -> SettlePolicy {
        SettlePolicy {
            retry: RetryPolicy {
                max_attempts: self.gateway_attempts,
                attempt_timeout: self.gateway_attempt_timeout,
                ..RetryPolicy::default()
            },
            first_delay: self.settle_first_delay,
            max_delay: self.settle_max_delay,
            key_retention: self.gateway_key_retention,
            confirm_deadline: self.confirm_deadline,
        }
    }

    pub fn mock_gateway(&self) -> MockConfig {
        MockConfig {
            delay: Duration::from_millis(self.gateway_delay_ms),
            decline_rate: self.gateway_decline_rate,
            error_rate: self.gateway_error_rate,
            drop_response_rate: self.gateway_drop_response_rate,
            hang_rate: self.gateway_hang_rate,
            key_retention: crate::stripe_sim::DEFAULT_KEY_RETENTION,
            response_delay: Duration::from_millis(self.gateway_response_delay_ms),
            ledger: self.gateway_ledger.clone(),
            #[cfg(feature = "fault-injection")]
            ignore_idempotency_keys: self.gateway_unsafe_ignore_idempotency_keys,
            #[cfg(not(feature = "fault-injection"))]
            ignore_idempotency_keys: false,
            settle_delay: self.gateway_settle_delay,
        }
    }
}

impl MockConfig {
    /// The flags of its delay, declines and faults, named alike by the service (with `prefix`
    /// `gateway-`) and by `mock-gateway` (no prefix).
    pub fn behaviour_args(&self, prefix: &str) -> Vec<String> {
        vec![
            format!("--{prefix}delay-ms={}", self.delay.as_millis()),
            format!("--{prefix}decline-rate={}", self.decline_rate),
            format!("--{prefix}error-rate={}", self.error_rate),
            format!("--{prefix}drop-response-rate={}", self.drop_response_rate),
            format!("--{prefix}hang-rate={}", self.hang_rate),
            format!("--{prefix}settle-delay={}ms", self.settle_delay.as_millis()),
        ]
    }

    /// The service's command-line flags that give this mock gateway: the inverse of
    /// [`Config::mock_gateway`], for whatever starts the service (the test harness).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = self.behaviour_args("gateway-");
        args.push(format!(
            "--gateway-response-delay-ms={}",
            self.response_delay.as_millis()
        ));
        if let Some(ledger) = &self.ledger {
            args.push(format!("--gateway-ledger={}", ledger.display()));
        }
        if self.ignore_idempotency_keys {
            args.push("--gateway-unsafe-ignore-idempotency-keys".to_owned());
        }
        args
    }
}

impl Config {
    /// Refuses to serve unsigned requests on an address others may reach, unless told to: an
    /// unsigned caller can invoke any handler with state of its own making (e.g. make
    /// `RefundPayment` act on a payment that does not exist).
    pub fn check_signing(&self) -> Result<(), String> {
        if self.identity_keys.is_empty() && !self.bind.ip().is_loopback() && !self.allow_unsigned {
            return Err(format!(
                "refusing to serve {} without identity keys: any caller that reaches this port \
                 could invoke handlers, with state of its own making. Give the Restate server's \
                 public key (--identity-keys / IDENTITY_KEYS; scripts/identity-public-key.sh \
                 prints it), bind a loopback address, or, on a network only Restate can reach, \
                 pass --allow-unsigned (ALLOW_UNSIGNED=true)",
                self.bind
            ));
        }
        Ok(())
    }
}

fn parse_version(s: &str) -> Result<String, String> {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "must be one URL path segment of letters, digits, '-', '_' or '.', got {s:?}"
        ))
    }
}

fn parse_webhook_secret(s: &str) -> Result<WebhookSecret, String> {
    if s.is_empty() {
        return Err("the webhook secret must not be empty".to_owned());
    }
    Ok(WebhookSecret::new(s))
}

/// A hold's window: at least a second (the timer that ends it is Restate's, in milliseconds).
fn parse_hold_expiry(s: &str) -> Result<Duration, String> {
    parse_at_least_a_second("the hold expiry", s)
}

fn parse_confirm_deadline(s: &str) -> Result<Duration, String> {
    parse_at_least_a_second("the confirmation deadline", s)
}

fn parse_at_least_a_second(what: &str, s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) {
        return Err(format!("{what} must be at least 1s, got {s}"));
    }
    Ok(d)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("must be between 0 and 1, got {rate}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsigned_only_on_loopback_unless_allowed() {
        let check = |args: &[&str]| {
            Config::try_parse_from(std::iter::once("payment-service").chain(args.iter().copied()))
                .unwrap()
                .check_signing()
        };
        assert!(check(&[]).is_ok());
        assert!(check(&["--bind", "[::1]:9090"]).is_ok());
        let refused = check(&["--bind", "0.0.0.0:9090"]).unwrap_err();
        assert!(refused.contains("without identity keys"), "{refused}");
        assert!(check(&["--bind", "10.0.0.5:9090"]).is_err());
        assert!(check(&["--bind", "0.0.0.0:9090", "--allow-unsigned"]).is_ok());
        assert!(check(&["--bind", "0.0.0.0:9090", "--identity-keys", "publickeyv1_x"]).is_ok());
    }

    #[test]
    fn defaults_match_the_seed() {
        let config = Config::try_parse_from(["payment-service"]).unwrap();
        assert_eq!(config.bind, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(config.gateway_delay_ms, 100);
        assert_eq!(config.gateway_decline_rate, 0.1);
        assert_eq!(config.gateway_error_rate, 0.0);
        assert_eq!(config.gateway_ledger, None);
        assert!(config.identity_keys.is_empty());
        assert_eq!(config.worker_threads, 1);
        assert_eq!(config.settle_policy(), SettlePolicy::default());
        assert_eq!(config.hold_expiry, crate::service::DEFAULT_HOLD_EXPIRY);
    }

    #[test]
    fn the_hold_expiry_is_a_duration_of_a_second_or_more() {
        let config = Config::try_parse_from(["payment-service", "--hold-expiry", "2s"]).unwrap();
        assert_eq!(config.hold_expiry, Duration::from_secs(2));
        assert!(Config::try_parse_from(["payment-service", "--hold-expiry", "500ms"]).is_err());
        assert!(Config::try_parse_from(["payment-service", "--hold-expiry", "soon"]).is_err());
    }

    #[test]
    fn the_confirmation_deadline_is_a_duration_of_a_second_or_more() {
        let config =
            Config::try_parse_from(["payment-service", "--confirm-deadline", "3s"]).unwrap();
        assert_eq!(
            config.settle_policy().confirm_deadline,
            Duration::from_secs(3)
        );
        assert!(Config::try_parse_from(["payment-service", "--confirm-deadline", "0s"]).is_err());
    }

    #[test]
    fn identity_keys_are_comma_separated() {
        let config = Config::try_parse_from([
            "payment-service",
            "--identity-keys",
            "publickeyv1_a,publickeyv1_b",
        ])
        .unwrap();
        assert_eq!(config.identity_keys, vec!["publickeyv1_a", "publickeyv1_b"]);
    }

    #[test]
    fn flags_override_and_rates_are_checked() {
        let config = Config::try_parse_from([
            "payment-service",
            "--bind",
            "127.0.0.1:0",
            "--gateway-decline-rate",
            "1",
        ])
        .unwrap();
        assert_eq!(config.gateway_decline_rate, 1.0);
        assert!(
            Config::try_parse_from(["payment-service", "--gateway-decline-rate", "1.5"]).is_err()
        );
        assert!(Config::try_parse_from(["payment-service", "--gateway-error-rate", "x"]).is_err());
        assert!(Config::try_parse_from(["payment-service", "--worker-threads", "0"]).is_err());
    }

    #[test]
    fn mock_gateway_flags_round_trip() {
        let mock = MockConfig {
            delay: Duration::from_millis(20),
            decline_rate: 0.25,
            error_rate: 0.25,
            drop_response_rate: 0.125,
            hang_rate: 0.0625,
            key_retention: crate::stripe_sim::DEFAULT_KEY_RETENTION,
            response_delay: Duration::from_millis(150),
            ledger: Some(PathBuf::from("/tmp/ledger.jsonl")),
            ignore_idempotency_keys: cfg!(feature = "fault-injection"),
            settle_delay: Duration::from_millis(750),
        };
        let args = std::iter::once("payment-service".to_owned()).chain(mock.to_args());
        assert_eq!(Config::try_parse_from(args).unwrap().mock_gateway(), mock);
        let default = MockConfig::default();
        let args = std::iter::once("payment-service".to_owned()).chain(default.to_args());
        assert_eq!(
            Config::try_parse_from(args).unwrap().mock_gateway(),
            default
        );
    }

    /// The production build has no switch that turns the gateway's key check off.
    #[cfg(not(feature = "fault-injection"))]
    #[test]
    fn the_key_check_cannot_be_switched_off() {
        let flag = [
            "payment-service",
            "--gateway-unsafe-ignore-idempotency-keys",
        ];
        assert!(Config::try_parse_from(flag).is_err());
    }

    #[test]
    fn the_gateway_is_the_mock_unless_told_and_stripe_needs_a_key() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(std::iter::once("payment-service").chain(args.iter().copied()))
        };
        let default = parse(&[]).unwrap();
        assert_eq!(default.gateway, GatewayKind::Mock);
        assert!(default.check_gateway().is_ok());
        assert!(parse(&["--gateway", "paypal"]).is_err());
        let keyless = parse(&["--gateway", "stripe"]).unwrap();
        let refused = keyless.check_gateway().unwrap_err();
        assert!(refused.contains("STRIPE_API_KEY"), "{refused}");
        let stripe = parse(&["--gateway", "stripe", "--stripe-api-key", "sk_test_x"])
            .unwrap()
            .stripe_gateway()
            .unwrap();
        assert_eq!(stripe, StripeConfig::new(ApiKey::new("sk_test_x")));
        assert_eq!(stripe.api_base, "https://api.stripe.com");
        assert_eq!(stripe.payment_method, "pm_card_visa");
        assert_eq!(stripe.allowed_payment_method_types, ["card"]);
    }

    #[test]
    fn stripe_gateway_flags_round_trip() {
        let mut stripe = StripeConfig::new(ApiKey::new("sk_test_x"));
        stripe.api_base = "http://127.0.0.1:8420".to_owned();
        stripe.payment_method = "pm_card_chargeCustomerFail".to_owned();
        for types in [vec![], vec!["card".to_owned(), "link".to_owned()]] {
            stripe.allowed_payment_method_types = types;
            let args = std::iter::once("payment-service".to_owned()).chain(stripe.to_args());
            let config = Config::try_parse_from(args).unwrap();
            assert_eq!(config.gateway, GatewayKind::Stripe);
            assert_eq!(config.stripe_gateway().unwrap(), stripe);
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Config::command().debug_assert();
    }
}
