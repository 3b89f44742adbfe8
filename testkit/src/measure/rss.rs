//! `stackctl measure rss`: the service's resident memory as the number of payments grows.
//! CreatePayment on fresh IDs, closed loop, until `--payments` requests were sent; every
//! `--rss-every` payments answered `completed`, a line: the service's VmRSS, the gateway
//! process's (with `--gateway-process`), and the service's CPU per payment and the throughput
//! since the line before. With `--gateway-process` the idempotency keys live in `mock-gateway`
//! (`--gateway stripe`), and the service's memory should not grow with them; with the
//! in-process mock (the default) they live in the service. Both without a ledger (the keys in
//! memory, no fsync), as the benchmark runs them. Results: `report.txt` and `rss.json` in the
//! scenario's folder.

use super::*;

/// One line of the measurement.
#[derive(Debug, Clone, Copy)]
struct Sample {
    payments: u64,
    seconds: f64,
    service_rss_kb: Option<u64>,
    gateway_rss_kb: Option<u64>,
    service_cpu_s: Option<f64>,
}

impl Sample {
    fn take(payments: u64, t0: Instant, service: u32, gateway: Option<u32>) -> Self {
        Self {
            payments,
            seconds: t0.elapsed().as_secs_f64(),
            service_rss_kb: load::status_kb(service).map(|(rss, _)| rss),
            gateway_rss_kb: gateway.and_then(load::status_kb).map(|(rss, _)| rss),
            service_cpu_s: load::cpu_seconds(service),
        }
    }

    /// The line of this sample, with CPU per payment and throughput since `before`.
    fn line(&self, before: Option<&Sample>) -> String {
        let mb = |kb: Option<u64>| kb.map_or("-".into(), |kb| format!("{:.1}", kb as f64 / 1024.0));
        let (cpu, rate) = match before {
            Some(b) if self.payments > b.payments => {
                let n = (self.payments - b.payments) as f64;
                let cpu = match (self.service_cpu_s, b.service_cpu_s) {
                    (Some(now), Some(then)) => format!("{:.0}", (now - then) * 1e6 / n),
                    _ => "-".into(),
                };
                (
                    cpu,
                    format!("{:.0}", n / (self.seconds - b.seconds).max(1e-9)),
                )
            }
            _ => ("-".into(), "-".into()),
        };
        format!(
            "{:>9} {:>8.1} {:>14} {:>14} {:>16} {:>8}",
            self.payments,
            self.seconds,
            mb(self.service_rss_kb),
            mb(self.gateway_rss_kb),
            cpu,
            rate
        )
    }

    fn to_json(self) -> Value {
        json!({
            "payments": self.payments,
            "seconds": (self.seconds * 10.0).round() / 10.0,
            "service_rss_kb": self.service_rss_kb,
            "gateway_rss_kb": self.gateway_rss_kb,
            "service_cpu_seconds": self.service_cpu_s,
        })
    }
}

pub(super) fn measure(stack: &Stack, args: &MeasureArgs, dir: &Path) -> anyhow::Result<()> {
    let service = stack.service_pid().context("the service is not running")?;
    let gateway = stack.gateway_pid();
    let every = args.rss_every.max(1);
    let workers = args.concurrency * 3;
    let mut report = Report::default();
    report.line(format!(
        "payment-service's resident memory over {} payments (CreatePayment on fresh IDs, {} \
         workers through one ingress), the gateway {}",
        args.payments,
        workers,
        match stack.gateway_url() {
            Some(url) => format!(
                "the mock-gateway process at {url} (--gateway stripe; its database in memory)"
            ),
            None => "the in-process mock (its keys in the service's memory)".to_owned(),
        },
    ));
    report.line(format!(
        "{:>9} {:>8} {:>14} {:>14} {:>16} {:>8}",
        "payments", "s", "service MB", "gateway MB", "service µs/pay", "pay/s"
    ));
    let t0 = Instant::now();
    let samples = Arc::new(Mutex::new(vec![Sample::take(0, t0, service, gateway)]));
    report.line(lock(&samples)[0].line(None));
    let ok = Arc::new(AtomicU64::new(0));
    let client = stack
        .client()
        .with_timeout(Duration::from_secs(args.timeout));
    let prefix = format!("rss-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let spec = ClosedLoop {
        workers,
        duration: Duration::from_secs(24 * 3600),
        limit: Some(args.payments),
        error_pause: Duration::from_secs_f64(args.error_pause),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let shared = (Arc::clone(&samples), Arc::clone(&ok));
    let run = rt.block_on(load::closed_loop(spec, &[], move |_, n| {
        let (samples, ok, client) = (Arc::clone(&shared.0), Arc::clone(&shared.1), client.clone());
        let key = format!("{prefix}-{n}");
        async move {
            let (outcome, _) = create(&client, 0, &key).await;
            if outcome.is_ok() {
                let done = ok.fetch_add(1, Ordering::Relaxed) + 1;
                // Sampled right when the count is reached: the lines are exactly `every` apart.
                if done % every == 0 {
                    let sample = Sample::take(done, t0, service, gateway);
                    let mut samples = lock(&samples);
                    println!("{}", sample.line(samples.last()));
                    samples.push(sample);
                }
            }
            Some((key, 0, outcome))
        }
    }));
    let samples = lock(&samples).clone();
    // The lines were printed as they came; the report keeps them too.
    for pair in samples.windows(2) {
        report.keep(pair[1].line(Some(&pair[0])));
    }
    let errors = run.errors();
    report.line(format!(
        "{} payments completed, {} errors {:?}, in {:.0} s",
        run.ok(),
        run.error_count(),
        errors,
        run.elapsed.as_secs_f64()
    ));
    let (hwm_service, hwm_gateway) = (
        load::status_kb(service).map(|(_, hwm)| hwm),
        gateway.and_then(load::status_kb).map(|(_, hwm)| hwm),
    );
    let growth = |first: Option<&Sample>, last: Option<&Sample>, f: fn(&Sample) -> Option<u64>| {
        Some((f(last?)? as f64 - f(first?)? as f64) / 1024.0)
    };
    // From the first line under load (the allocator and the runtime have grown to their
    // working size by then) to the last.
    let (first, last) = (samples.get(1), samples.last());
    let service_growth = growth(first, last, |s| s.service_rss_kb);
    let gateway_growth = growth(first, last, |s| s.gateway_rss_kb);
    if let (Some(first), Some(last)) = (first, last) {
        report.line(format!(
            "service RSS from {} to {} payments: {} MB (VmHWM {}){}",
            first.payments,
            last.payments,
            service_growth.map_or("-".into(), |g| format!("{g:+.1}")),
            hwm_service.map_or("-".into(), |kb| format!("{:.1} MB", kb as f64 / 1024.0)),
            gateway_growth.map_or(String::new(), |g| format!("; mock-gateway: {g:+.1} MB")),
        ));
    }
    report.save(&dir.join("report.txt"))?;
    let json = json!({
        "gateway": if gateway.is_some() { "mock-gateway process (--gateway stripe)" } else { "in-process mock" },
        "payments": args.payments,
        "every": every,
        "workers": workers,
        "completed": run.ok(),
        "errors": errors,
        "seconds": run.elapsed.as_secs_f64(),
        "samples": samples.iter().map(|s| s.to_json()).collect::<Vec<_>>(),
        "service_rss_growth_mb": service_growth,
        "gateway_rss_growth_mb": gateway_growth,
        "service_vmhwm_kb": hwm_service,
        "gateway_vmhwm_kb": hwm_gateway,
    });
    std::fs::write(
        dir.join("rss.json"),
        format!("{}\n", serde_json::to_string_pretty(&json)?),
    )
    .context("writing rss.json")?;
    anyhow::ensure!(run.ok() > 0, "no payment completed: {errors:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_the_memory_now_and_cpu_and_rate_since_the_line_before() {
        let before = Sample {
            payments: 10_000,
            seconds: 10.0,
            service_rss_kb: Some(15 * 1024),
            gateway_rss_kb: None,
            service_cpu_s: Some(2.0),
        };
        let now = Sample {
            payments: 20_000,
            seconds: 15.0,
            service_rss_kb: Some(16 * 1024),
            gateway_rss_kb: Some(40 * 1024),
            service_cpu_s: Some(3.5),
        };
        let cells: Vec<String> = now
            .line(Some(&before))
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        // 1.5 s of CPU over 10,000 payments; 10,000 payments in 5 s.
        assert_eq!(cells, ["20000", "15.0", "16.0", "40.0", "150", "2000"]);
        let first: Vec<String> = before
            .line(None)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert_eq!(first, ["10000", "10.0", "15.0", "-", "-", "-"]);
    }
}
