//! Upgrades: each build is registered as a new deployment (its own URI), never over the old
//! one with `force`, so a payment the old build left mid-charge finishes on the old build while
//! new payments run on the new one.

use std::thread;
use std::time::Duration;

use payment_service::gateway::MockConfig;
use payment_service::payment::{CreatePaymentBody, PaymentStatus};
use testkit::client::Answer;
use testkit::ledger::{LedgerEntry, LedgerOp, of_payment};
use testkit::stack::{ExtraService, Stack, wait_until};

use crate::helpers::{own_stack, unique_id};

/// The old build's gateway acts, then takes this long to answer: it is killed in between,
/// with the charge made and its result not yet journaled.
const OLD_RESPONSE_DELAY: Duration = Duration::from_millis(1500);
const OLD_VERSION: &str = "build-old";
const NEW_VERSION: &str = "build-new";

fn charges(entries: &[LedgerEntry]) -> Vec<&LedgerEntry> {
    entries
        .iter()
        .filter(|e| e.op == LedgerOp::Charge && !e.replay)
        .collect()
}

#[test]
fn a_payment_left_mid_charge_by_the_old_build_completes_on_it_after_the_new_one_is_registered() {
    // The new build: the same binary (what matters is that it is another deployment), started
    // with the stack, registered by the test. Its own ledger shows what it charged.
    let new_ledger = testkit::process::temp_dir("upgrade-new-")
        .expect("a temp dir")
        .join("gateway-ledger.jsonl");
    let new_gateway = MockConfig {
        delay: Duration::ZERO,
        decline_rate: 0.0,
        ledger: Some(new_ledger.clone()),
        ..MockConfig::default()
    };
    let app = own_stack(
        Stack::builder()
            .deployment_version(OLD_VERSION)
            .gateway(MockConfig {
                delay: Duration::ZERO,
                decline_rate: 0.0,
                response_delay: OLD_RESPONSE_DELAY,
                ..MockConfig::default()
            })
            .extra_service(ExtraService {
                name: "payment-service-new".into(),
                bin: env!("CARGO_BIN_EXE_payment-service").into(),
                args: new_gateway.to_args(),
                version: Some(NEW_VERSION.into()),
                register: false,
            }),
    );
    let stack = app.stack();
    let admin = app.admin();
    let old_ledger = stack
        .ledger()
        .expect("an own stack has a ledger")
        .to_owned();
    let old_url = stack.service_url().to_owned();
    let new_url = stack.extra_url(0).to_owned();
    assert!(old_url.ends_with(&format!("/{OLD_VERSION}")), "{old_url}");
    assert!(new_url.ends_with(&format!("/{NEW_VERSION}")), "{new_url}");

    // Each build answers under its own path only: a request meant for the other build's
    // deployment is refused, not run on this build's code.
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client");
    let status = |url: String| http.get(&url).send().map(|r| r.status().as_u16());
    let new_port_base = new_url.trim_end_matches(&format!("/{NEW_VERSION}"));
    assert_eq!(status(format!("{old_url}/health")).ok(), Some(200));
    assert_eq!(
        status(format!("{new_port_base}/{OLD_VERSION}/health")).ok(),
        Some(404),
        "the new build ran a request for the old build's deployment"
    );

    let old_id = unique_id("upgrade-old");
    let new_id = unique_id("upgrade-new");
    let body = |amount| CreatePaymentBody::new(amount, "cust-upgrade");

    let answer = thread::scope(|s| {
        let create = s.spawn(|| app.run(app.api().create_payment(&old_id, &body(3100))));
        // Mid-charge: the old build's gateway has charged; its answer is still on the way.
        let charged = || of_payment(&old_ledger, &old_id).is_ok_and(|e| !e.is_empty());
        if let Err(e) = wait_until(Duration::from_secs(30), "the old build's charge", || {
            Ok(charged())
        }) {
            panic!("{e}\n{}", stack.logs());
        }
        assert!(stack.kill_service(), "the old build was not running");

        let old_invocation = admin
            .invocations_of(&old_id)
            .expect("sys_invocation")
            .into_iter()
            .find(|i| i.target_handler_name == "CreatePayment")
            .expect("the old payment's invocation");
        let old_deployment = admin
            .pinned_deployment(&old_invocation.id)
            .expect("sys_invocation")
            .expect("the old payment is pinned to a deployment");

        // The upgrade: the new build registered as a deployment of its own.
        let new_deployment = stack.register(&new_url).expect("registering the new build");
        assert_ne!(
            new_deployment, old_deployment,
            "the new build did not get a deployment of its own"
        );
        let deployments = admin.deployments().expect("GET /deployments");
        let registered = |id: &str| deployments.get(id).map(|u| u.trim_end_matches('/'));
        assert_eq!(
            registered(&old_deployment),
            Some(old_url.as_str()),
            "the old deployment is not registered at the old build's URL: {deployments:#?}"
        );
        assert_eq!(
            registered(&new_deployment),
            Some(new_url.as_str()),
            "{deployments:#?}"
        );

        // A new payment runs on the new build, while the old one waits for the old build.
        match app.create_payment(&new_id, &body(700)) {
            Answer::Ok(paid) => assert_eq!(paid.status, PaymentStatus::Completed, "{paid:?}"),
            other => panic!("CreatePayment {new_id} on the new build: {other:?}"),
        }
        let new_invocation = admin
            .invocations_of(&new_id)
            .expect("sys_invocation")
            .into_iter()
            .find(|i| i.target_handler_name == "CreatePayment")
            .expect("the new payment's invocation");
        assert_eq!(
            admin
                .pinned_deployment(&new_invocation.id)
                .expect("sys_invocation"),
            Some(new_deployment.clone()),
            "the new payment did not run on the new build"
        );
        assert_eq!(
            admin
                .pinned_deployment(&old_invocation.id)
                .expect("sys_invocation"),
            Some(old_deployment.clone()),
            "the old payment moved off the old build's deployment"
        );
        assert_eq!(admin.unfinished_on(&old_deployment).expect("query"), 1);

        // The old build comes back (it stays up until its deployment drains); Restate retries
        // the old payment on it, from its journal.
        stack.start_service().expect("restarting the old build");
        let answer = create.join().expect("the create call panicked");
        wait_until(
            Duration::from_secs(60),
            "the old deployment to drain",
            || Ok(admin.unfinished_on(&old_deployment)? == 0),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.logs()));
        assert_eq!(
            admin
                .pinned_deployment(&old_invocation.id)
                .expect("sys_invocation"),
            Some(old_deployment),
            "the old payment did not finish on the old build's deployment"
        );
        answer
    });

    // The old payment's own call is answered completed (it waits across the restart; a
    // client that gave up would get the same answer again from the payment's idempotency).
    match answer {
        Ok(Answer::Ok(paid)) => assert_eq!(paid.status, PaymentStatus::Completed, "{paid:?}"),
        other => panic!("CreatePayment {old_id} across the upgrade: {other:?}"),
    }
    let invocations = admin.invocations_of(&old_id).expect("sys_invocation");
    let creates: Vec<_> = invocations
        .iter()
        .filter(|i| i.target_handler_name == "CreatePayment")
        .collect();
    assert_eq!(creates.len(), 1, "{invocations:#?}");
    assert_eq!(creates[0].status, "completed", "{invocations:#?}");
    assert_eq!(
        creates[0].completion_result.as_deref(),
        Some("success"),
        "{invocations:#?}"
    );
    assert_eq!(
        app.payment(&old_id).status,
        PaymentStatus::Completed,
        "GetPayment {old_id}"
    );

    // One charge of the old payment, by the old build (its retry answered from the gateway's
    // idempotency key); none by the new build. The new payment: charged by the new build only.
    let old_on_old = of_payment(&old_ledger, &old_id).expect("the old build's ledger");
    assert_eq!(charges(&old_on_old).len(), 1, "{old_on_old:#?}");
    let old_on_new = of_payment(&new_ledger, &old_id).unwrap_or_default();
    assert!(
        old_on_new.is_empty(),
        "the new build called the gateway for the old payment: {old_on_new:#?}"
    );
    let new_on_new = of_payment(&new_ledger, &new_id).expect("the new build's ledger");
    assert_eq!(charges(&new_on_new).len(), 1, "{new_on_new:#?}");
    let new_on_old = of_payment(&old_ledger, &new_id).expect("the old build's ledger");
    assert!(new_on_old.is_empty(), "{new_on_old:#?}");
}
