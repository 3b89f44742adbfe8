//! The crash test's clients: each payment's calls, as its plan says, through the typed client
//! (which retries transient outcomes until its deadline, moving to the next ingress that is up).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use payment_service::payment::{
    CaptureMethod, CapturePaymentBody, CreatePaymentBody, Payment, PaymentStatus, RefundPaymentBody,
};

use super::audit::{PaymentLog, Reply};
use super::plan::PaymentPlan;
use crate::client::{Answer, CAPTURE, CREATE, GET, PaymentClient, REFUND};
use crate::load;

/// How long a client waits for a payment answered `pending` to settle before its refunds.
const SETTLE_WAIT: Duration = Duration::from_secs(120);

/// Every payment's flow, each started at its planned time; a progress line every 10 s.
pub async fn run_all(
    client: PaymentClient,
    plans: Vec<PaymentPlan>,
    t0: Instant,
) -> Vec<PaymentLog> {
    let total = plans.len();
    let done = Arc::new(AtomicUsize::new(0));
    let progress = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.tick().await;
            loop {
                tick.tick().await;
                let n = done.load(Ordering::Relaxed);
                println!("crash: waiting for clients: {n}/{total} payments done");
            }
        })
    };
    let schedule = plans.into_iter().map(|p| (p.start, p)).collect();
    let logs = load::scheduled(t0, schedule, move |plan| {
        let (client, done) = (client.clone(), Arc::clone(&done));
        async move {
            let log = run_payment(&client, &plan).await;
            done.fetch_add(1, Ordering::Relaxed);
            log
        }
    })
    .await;
    progress.abort();
    logs
}

/// One payment: its concurrent creates; once one is answered (and, if answered `pending`, once
/// GetPayment shows it settled), its refunds (after a pause), then a GetPayment.
async fn run_payment(client: &PaymentClient, plan: &PaymentPlan) -> PaymentLog {
    let body = CreatePaymentBody {
        amount: plan.amount,
        currency: Some("USD".into()),
        description: Some("crash test".into()),
        customer_id: Some(plan.customer.clone()),
        capture: plan.hold.as_ref().map(|_| CaptureMethod::Manual),
    };
    let creates = (0..plan.creates).map(|k| {
        let (client, id, body) = (client.clone(), plan.id.clone(), body.clone());
        let at = plan.ingress(k);
        tokio::spawn(async move { client.call(at, &id, CREATE, &body).await })
    });
    let mut log = PaymentLog {
        creates: join(creates).await,
        ..PaymentLog::default()
    };
    if !log.creates.iter().any(|a| matches!(a, Ok(Answer::Ok(_)))) {
        return log;
    }
    // Answered `pending` (the gateway's outcome unknown): a client that wants a refund waits
    // until the service has settled the payment, as a refund of a pending one is refused.
    let settled = log
        .creates
        .iter()
        .any(|a| matches!(a, Ok(Answer::Ok(r)) if r.status != PaymentStatus::Pending));
    let refunds_planned = plan.refund_calls() + plan.hold_calls() > 0;
    if refunds_planned && !settled {
        let at = plan.ingress(plan.creates);
        let deadline = Instant::now() + SETTLE_WAIT;
        loop {
            match get(client, &plan.id, at).await {
                Ok(Answer::Ok(p)) if p.status != PaymentStatus::Pending => break,
                _ if Instant::now() >= deadline => return log,
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
    if refunds_planned {
        tokio::time::sleep(plan.refund_pause).await;
    }
    if !plan.refunds.is_empty() {
        let refunds = plan.refunds.iter().enumerate().map(|(k, &amount)| {
            let (client, id) = (client.clone(), plan.id.clone());
            let at = plan.ingress(plan.creates + k);
            let body = RefundPaymentBody {
                reason: Some("crash test refund".into()),
                amount,
                refund_key: None,
            };
            tokio::spawn(async move { (amount, client.call(at, &id, REFUND, &body).await) })
        });
        log.refunds = join(refunds).await;
    }
    if !plan.keyed_refunds.is_empty() {
        let copies = plan
            .keyed_refunds
            .iter()
            .flat_map(|k| std::iter::repeat_n(k, k.copies));
        let keyed = copies.enumerate().map(|(k, part)| {
            let (client, id) = (client.clone(), plan.id.clone());
            let at = plan.ingress(plan.creates + plan.refunds.len() + k);
            let body = RefundPaymentBody {
                reason: Some("crash test refund in parts".into()),
                amount: part.amount,
                refund_key: Some(part.key.clone()),
            };
            let key = part.key.clone();
            tokio::spawn(async move { (key, client.call(at, &id, REFUND, &body).await) })
        });
        log.keyed_refunds = join(keyed).await;
    }
    if let Some(hold) = &plan.hold {
        let first = plan.creates + plan.refund_calls();
        let calls = (0..hold.calls()).map(|k| {
            let (client, id) = (client.clone(), plan.id.clone());
            let (handler, amount) = hold.call(k);
            let at = plan.ingress(first + k);
            tokio::spawn(async move {
                let answer = match handler {
                    CAPTURE => {
                        let body = CapturePaymentBody { amount };
                        client.call(at, &id, CAPTURE, &body).await
                    }
                    _ => client.call(at, &id, handler, &serde_json::json!({})).await,
                };
                (handler, answer)
            })
        });
        log.holds = join(calls).await;
    }
    let at = plan.ingress(plan.creates + plan.refund_calls() + plan.hold_calls());
    log.get = Some(get(client, &plan.id, at).await);
    log
}

/// The final GetPayment of every payment, in plan order.
pub async fn final_states(client: PaymentClient, plans: Vec<PaymentPlan>) -> Vec<Reply<Payment>> {
    let mut finals = Vec::with_capacity(plans.len());
    for plan in &plans {
        let at = plan.ingresses.last().copied().unwrap_or(0);
        finals.push(get(&client, &plan.id, at).await);
    }
    finals
}

async fn get(client: &PaymentClient, id: &str, at: usize) -> Reply<Payment> {
    client.call(at, id, GET, &serde_json::json!({})).await
}

async fn join<T: Send + 'static>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("a client task panicked"));
    }
    out
}
