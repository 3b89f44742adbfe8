//! The benchmark's second stack: the gateway as the `mock-gateway` process (a simulated Stripe
//! at 0 ms and 0 declines, its database in memory) and the service with `--gateway stripe`
//! against it. CreatePayment on fresh IDs at `--concurrency` for `--gateway-duration` seconds,
//! then at concurrency 1 for `--latency-duration`; the figures go beside the in-process ones
//! (the first stack's summary) in one table, and into that summary as `mock_gateway`. Reported,
//! not checked: the targets are the in-process stack's.

use super::*;

/// Runs the second stack in `out/mock-gateway/`, prints the comparison with `in_process` (the
/// first stack's summary), and adds both to `out/report.txt` and `out/summary.json`.
pub(super) fn gateway_process_side(
    args: &BenchArgs,
    label: &str,
    config: Option<PathBuf>,
    out: &Path,
    mut in_process: Value,
) -> anyhow::Result<()> {
    let dir = out.join("mock-gateway");
    eprintln!(
        "[bench] [{label}] starting the stack with the mock-gateway process in {}",
        dir.display()
    );
    let stack = Stack::builder()
        .config(config)
        .gateway(MockConfig {
            delay: Duration::ZERO,
            decline_rate: 0.0,
            ..MockConfig::default()
        })
        .gateway_process()
        // As the in-process run: no ledger, and mock-gateway's database in memory (no fsync).
        .without_ledger()
        .dir(&dir)
        .start()?;
    let result = measure(&stack, args);
    drop(stack);
    remove_data(args, &dir);
    let (mut report, side) = result?;
    let c64 = side.c64.to_json();
    let c1 = side.c1.as_ref().map(Measured::to_json);
    comparison(&mut report, &in_process, &c64, c1.as_ref(), args);
    let scenarios: Vec<Value> = std::iter::once(c64).chain(c1).collect();
    in_process["mock_gateway"] = json!({
        "scenarios": scenarios,
        "settings": {
            "concurrency": args.concurrency,
            "duration_s": args.gateway_duration,
            "latency_duration_s": args.latency_duration,
            "warmup_s": args.warmup,
            "gateway_delay_ms": 0,
            "gateway_db": "in memory",
        },
        "mock_gateway_bin": bin_note(paths::mock_gateway()),
        "service_vmhwm_mb": side.service_hwm_kb.map(kb_to_mb),
        "gateway_vmhwm_mb": side.gateway_hwm_kb.map(kb_to_mb),
        "other_processes_cpu_cores_max": round3(side.noise),
    });
    let report_path = out.join("report.txt");
    let mut text = std::fs::read_to_string(&report_path).unwrap_or_default();
    text.push_str(report.text());
    std::fs::write(&report_path, text)
        .with_context(|| format!("writing {}", report_path.display()))?;
    let json_path = out.join("summary.json");
    std::fs::write(
        &json_path,
        format!("{}\n", serde_json::to_string_pretty(&in_process)?),
    )
    .with_context(|| format!("writing {}", json_path.display()))?;
    eprintln!(
        "[bench] mock-gateway figures added to {}",
        json_path.display()
    );
    Ok(())
}

/// What the second stack measured.
struct Side {
    c64: Measured,
    c1: Option<Measured>,
    service_hwm_kb: Option<u64>,
    gateway_hwm_kb: Option<u64>,
    noise: f64,
}

fn measure(stack: &Stack, args: &BenchArgs) -> anyhow::Result<(Report, Side)> {
    let pids = super::sampled_pids([
        ("service", stack.service_pid()),
        ("gateway", stack.gateway_pid()),
        ("server", stack.node_pid(0)),
    ])?;
    let ingress = stack.ingress_url(0);
    let mut bench = Bench {
        client: PaymentClient::new(vec![ingress.clone()])
            .with_timeout(Duration::from_secs(args.timeout)),
        pids,
        args,
        id: format!("g{:x}", unix_millis()),
        report: Report::default(),
    };
    bench.report.line("");
    bench.report.line(format!(
        "CreatePayment with the gateway as a process: mock-gateway at {} (delay 0, declines 0, \
         database in memory), the service with --gateway stripe against it; concurrency {}, \
         {} s; ingress {ingress}",
        stack.gateway_url().unwrap_or("?"),
        args.concurrency,
        args.gateway_duration,
    ));
    // One thread, as in the in-process run: the client's CPU is measured apart.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (c64, c1) = rt.block_on(bench.gateway_side())?;
    let noise = [Some(&c64), c1.as_ref()]
        .into_iter()
        .flatten()
        .map(Measured::other_cores)
        .fold(0.0, f64::max);
    bench.warn_noise(noise);
    let side = Side {
        c64,
        c1,
        service_hwm_kb: bench.hwm_kb("service"),
        gateway_hwm_kb: bench.hwm_kb("gateway"),
        noise,
    };
    Ok((bench.report, side))
}

impl Bench<'_> {
    async fn gateway_side(&mut self) -> anyhow::Result<(Measured, Option<Measured>)> {
        if self.args.warmup > 0 {
            eprintln!("warm-up: {} s on CreatePayment", self.args.warmup);
            let s = Scenario {
                duration: Duration::from_secs(self.args.warmup),
                ..self.create_fresh("warm-up create", "w")
            };
            let m = self.run(&s).await;
            if m.run.ok() == 0 {
                bail!(
                    "warm-up through mock-gateway: no request succeeded; errors: {:?}",
                    m.run.errors()
                );
            }
        }
        self.print_header();
        let s = Scenario {
            duration: Duration::from_secs(self.args.gateway_duration),
            ..self.create_fresh("create fresh, mock-gateway", "c")
        };
        let c64 = self.gateway_row(&s).await;
        let c1 = if self.args.latency_duration > 0 {
            let s = Scenario {
                concurrency: 1,
                duration: Duration::from_secs(self.args.latency_duration),
                ..self.create_fresh("create fresh c=1, mock-gw", "c1")
            };
            Some(self.gateway_row(&s).await)
        } else {
            None
        };
        Ok((c64, c1))
    }

    /// A row, and the gateway process's CPU and memory under it.
    async fn gateway_row(&mut self, s: &Scenario) -> Measured {
        let m = self.row(s).await;
        let gateway = m.proc("gateway");
        self.report.line(format!(
            "    mock-gateway: {} µs CPU per payment, {} MB peak RSS",
            gateway.map_or("-".into(), |p| format!(
                "{:.0}",
                p.cpu_seconds * 1e6 / m.run.ok().max(1) as f64
            )),
            gateway
                .and_then(|p| p.rss_max_kb)
                .map_or("-".into(), |kb| format!("{:.1}", kb as f64 / 1024.0)),
        ));
        m
    }
}

/// The in-process mock's CreatePayment figures (from the first stack's summary) beside the
/// mock-gateway process's, with the ratio of the two.
fn comparison(
    report: &mut Report,
    in_process: &Value,
    c64: &Value,
    c1: Option<&Value>,
    args: &BenchArgs,
) {
    let created = in_process["scenarios"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "create fresh")
        .cloned()
        .unwrap_or(Value::Null);
    let created_c1 = in_process["concurrency_1"]["create"].clone();
    let num = |s: &Value, ptr: &str| s.pointer(ptr).and_then(Value::as_f64);
    let cpu = |role: &str| format!("/processes/{role}/cpu_us_per_request");
    let both = |s: &Value| Some(num(s, &cpu("service"))? + num(s, &cpu("gateway")).unwrap_or(0.0));
    let c = format!("c={}", args.concurrency);
    let rows: Vec<(String, Option<f64>, Option<f64>, u8)> = vec![
        (
            format!("CreatePayment req/s, {c}"),
            num(&created, "/throughput_rps"),
            num(c64, "/throughput_rps"),
            0,
        ),
        (
            format!("p50 ms, {c}"),
            num(&created, "/latency_ms/p50"),
            num(c64, "/latency_ms/p50"),
            2,
        ),
        (
            format!("p99 ms, {c}"),
            num(&created, "/latency_ms/p99"),
            num(c64, "/latency_ms/p99"),
            2,
        ),
        (
            "p50 ms, c=1".into(),
            num(&created_c1, "/latency_ms/p50"),
            c1.and_then(|s| num(s, "/latency_ms/p50")),
            2,
        ),
        (
            "p99 ms, c=1".into(),
            num(&created_c1, "/latency_ms/p99"),
            c1.and_then(|s| num(s, "/latency_ms/p99")),
            2,
        ),
        (
            format!("service CPU µs/payment, {c}"),
            num(&created, &cpu("service")),
            num(c64, &cpu("service")),
            0,
        ),
        (
            format!("gateway CPU µs/payment, {c}"),
            None,
            num(c64, &cpu("gateway")),
            0,
        ),
        (
            format!("service + gateway µs/payment, {c}"),
            both(&created),
            both(c64),
            0,
        ),
        (
            format!("restate-server CPU µs/payment, {c}"),
            num(&created, &cpu("server")),
            num(c64, &cpu("server")),
            0,
        ),
        (
            format!("service peak RSS MB, {c}"),
            num(&created, "/processes/service/rss_max_mb"),
            num(c64, "/processes/service/rss_max_mb"),
            1,
        ),
        (
            format!("errors, {c}"),
            num(&created, "/errors"),
            num(c64, "/errors"),
            0,
        ),
    ];
    report.line("");
    report.line(
        "CreatePayment, in-process mock (the rounds above) vs mock-gateway process (reported, \
         no target):",
    );
    report.line(format!(
        "  {:<36} {:>12} {:>13} {:>7}",
        "", "in-process", "mock-gateway", "ratio"
    ));
    for (name, a, b, decimals) in rows {
        let cell = |v: Option<f64>, none: &str| {
            v.map_or(none.to_owned(), |v| {
                format!("{v:.prec$}", prec = decimals as usize)
            })
        };
        let ratio = match (a, b) {
            (Some(a), Some(b)) if a > 0.0 => format!("{:.2}x", b / a),
            _ => "-".into(),
        };
        report.line(format!(
            "  {name:<36} {:>12} {:>13} {ratio:>7}",
            cell(a, "(in service)"),
            cell(b, "-"),
        ));
    }
    report.line(format!(
        "  in-process: CreatePayment's {} rounds of {} s merged (a stack that also runs the \
         floor); mock-gateway: one run of {} s on a fresh stack, every gateway call a new TCP \
         connection (the Stripe client keeps no idle connections)",
        args.rounds, args.round_duration, args.gateway_duration
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn row<'a>(report: &'a Report, name: &str) -> Vec<&'a str> {
        let line = report
            .text()
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no row {name:?} in:\n{}", report.text()));
        line[2 + name.len()..].split_whitespace().collect()
    }

    #[test]
    fn the_comparison_puts_both_gateways_figures_side_by_side() {
        let args = Cli::parse_from(["bench"]).args;
        let in_process = json!({
            "scenarios": [
                {"name": "floor", "throughput_rps": 9999.0},
                {"name": "create fresh", "throughput_rps": 1000.0, "errors": 0,
                 "latency_ms": {"p50": 10.0, "p99": 20.0},
                 "processes": {"service": {"cpu_us_per_request": 100.0},
                               "server": {"cpu_us_per_request": 1000.0}}},
            ],
            "concurrency_1": {"create": {"latency_ms": {"p50": 4.0, "p99": 8.0}}},
        });
        let c64 = json!({
            "throughput_rps": 500.0, "errors": 3,
            "latency_ms": {"p50": 30.0, "p99": 50.0},
            "processes": {"service": {"cpu_us_per_request": 150.0},
                          "gateway": {"cpu_us_per_request": 50.0},
                          "server": {"cpu_us_per_request": 1100.0}},
        });
        let c1 = json!({"latency_ms": {"p50": 5.0, "p99": 12.0}});
        let mut report = Report::default();
        comparison(&mut report, &in_process, &c64, Some(&c1), &args);
        assert_eq!(
            row(&report, "CreatePayment req/s, c=64"),
            ["1000", "500", "0.50x"]
        );
        assert_eq!(row(&report, "p99 ms, c=64"), ["20.00", "50.00", "2.50x"]);
        assert_eq!(row(&report, "p50 ms, c=1"), ["4.00", "5.00", "1.25x"]);
        assert_eq!(
            row(&report, "gateway CPU µs/payment, c=64"),
            ["(in", "service)", "50", "-"]
        );
        assert_eq!(
            row(&report, "service + gateway µs/payment, c=64"),
            ["100", "200", "2.00x"]
        );
        assert_eq!(row(&report, "errors, c=64"), ["0", "3", "-"]);
    }
}
