use super::*;

const STAT: &str = "cpu  1000 100 300 5000 50 0 40 10 0 0\ncpu0 500 50 150 2500 25 0 20 5 0 0\n\
                    cpu1 500 50 150 2500 25 0 20 5 0 0\nintr 1 2 3\nctxt 99\nprocs_running 3\nprocs_blocked 0\n";

#[test]
fn psi_some_avg10_is_a_ratio() {
    let t =
        "some avg10=12.50 avg60=3.71 avg300=3.86 total=4426114931\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
    assert_eq!(parse_psi_some_avg10(t), Some(0.125));
    assert_eq!(parse_psi_some_avg10("full avg10=1.00 total=0\n"), None);
    assert_eq!(parse_psi_some_avg10("some avg60=1.00\n"), None);
    assert_eq!(parse_psi_some_avg10("some avg10=x\n"), None);
    assert_eq!(parse_psi_some_avg10(""), None);
}

#[test]
fn proc_stat_gives_busy_steal_total_run_queue_and_cpus() {
    let s = parse_proc_stat(STAT).unwrap();
    assert_eq!(s.busy, 1000 + 100 + 300 + 40);
    assert_eq!(s.steal, 10);
    assert_eq!(s.total, 1440 + 5000 + 50 + 10);
    assert_eq!(s.procs_running, Some(3));
    assert_eq!(s.cpus, 2);
    // An old kernel without steal; a malformed line; no cpu line.
    assert_eq!(parse_proc_stat("cpu 1 2 3 4\n").unwrap().steal, 0);
    assert_eq!(parse_proc_stat("cpu 1 2 x 4\n"), None);
    assert_eq!(parse_proc_stat("cpu 1 2\n"), None);
    assert_eq!(parse_proc_stat("procs_running 1\n"), None);
}

#[test]
fn self_stat_counts_after_the_command_name() {
    let t = "4242 (vmesh (a) b) S 1 4242 4242 0 -1 4194560 100 0 0 0 70 30 0 0 20 0 5 0 1 2 3\n";
    assert_eq!(parse_self_cpu_ticks(t), Some(100));
    assert_eq!(parse_self_cpu_ticks("4242 (vmesh) S 1"), None);
}

#[test]
fn cgroup_v2_path_is_the_zero_line() {
    assert_eq!(
        cgroup_v2_path("4:memory:/x\n0::/system.slice/vmesh.service\n"),
        Some("/system.slice/vmesh.service")
    );
    assert_eq!(cgroup_v2_path("4:memory:/x\n"), None);
}

/// A fake `/proc` in a temp dir, written between samples.
fn write_proc(dir: &Path, stat: &str, self_ticks: (u64, u64), psi: Option<&str>) {
    std::fs::create_dir_all(dir.join("self")).unwrap();
    std::fs::create_dir_all(dir.join("pressure")).unwrap();
    std::fs::write(dir.join("stat"), stat).unwrap();
    let self_stat = format!(
        "7 (vmesh) S 1 7 7 0 -1 0 0 0 0 0 {} {} 0 0 20 0 5 0 1 2 3\n",
        self_ticks.0, self_ticks.1
    );
    std::fs::write(dir.join("self/stat"), self_stat).unwrap();
    match psi {
        Some(p) => std::fs::write(dir.join("pressure/cpu"), p).unwrap(),
        None => {
            let _ = std::fs::remove_file(dir.join("pressure/cpu"));
        }
    }
}

#[test]
fn sampler_turns_counter_deltas_into_shares_and_missing_files_into_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let cgroup = dir.path().join("cgroup.pressure");
    let mut sampler = Sampler::new(Sources::at(dir.path(), Some(cgroup.clone())));
    write_proc(
        dir.path(),
        "cpu 100 0 100 800 0 0 0 0\ncpu0 1\nprocs_running 2\n",
        (10, 10),
        None,
    );
    let first = sampler.sample();
    assert_eq!(first.cpu_pressure, None, "no PSI file: unknown");
    assert_eq!(first.cgroup_cpu_pressure, None);
    assert_eq!(
        (first.cpu_steal, first.cpu_busy, first.agent_cpu),
        (None, None, None),
        "one reading"
    );
    assert_eq!((first.run_queue, first.cpus), (Some(2), 1));

    // 1000 ticks later: 600 busy, 100 stolen, the agent used 50 of them.
    write_proc(
        dir.path(),
        "cpu 500 0 300 1100 0 0 0 100\ncpu0 1\nprocs_running 5\n",
        (40, 30),
        Some("some avg10=42.00 avg60=0 avg300=0 total=1\n"),
    );
    std::fs::write(&cgroup, "some avg10=7.25 avg60=0.00 avg300=0.00 total=9\n").unwrap();
    let second = sampler.sample();
    assert_eq!(second.cpu_pressure, Some(0.42));
    assert_eq!(second.cgroup_cpu_pressure, Some(0.0725));
    assert_eq!(second.cpu_busy, Some(0.6));
    assert_eq!(second.cpu_steal, Some(0.1));
    assert_eq!(second.agent_cpu, Some(0.05));
    assert_eq!(second.run_queue, Some(5));

    // Everything gone (a container without /proc access): unknown, not an error.
    std::fs::remove_dir_all(dir.path()).unwrap();
    let gone = sampler.sample();
    assert_eq!(gone, HostSample::default());
}

#[test]
fn gauges_round_trip_and_unknown_stays_unknown() {
    let g = HostGauges::new();
    assert_eq!(g.load(), HostSample::default());
    let s = HostSample {
        cpu_pressure: Some(0.1234),
        cgroup_cpu_pressure: None,
        cpu_steal: Some(0.0),
        cpu_busy: Some(1.0),
        run_queue: Some(7),
        agent_cpu: Some(0.0001),
        cpus: 2,
    };
    let before = g.generation();
    g.store(&s);
    assert_eq!(g.load(), s);
    assert_ne!(g.generation(), before);
    g.store(&HostSample {
        cpu_pressure: Some(f64::NAN),
        cpu_steal: Some(3.0),
        ..HostSample::default()
    });
    let l = g.load();
    assert_eq!(
        (l.cpu_pressure, l.cpu_steal),
        (None, Some(1.0)),
        "NaN unknown, ratios clamped"
    );
}

#[test]
fn window_keeps_a_minute_of_histogram_increments() {
    let m = HostMonitor::new();
    let mut totals = TimingTotals::default();
    for i in 0..(WINDOW_SECONDS as u64 + 5) {
        totals.overhead[0] += i;
        totals.upstream[3] += 2;
        m.record(HostSample::default(), totals.clone(), 1000 + i);
    }
    let w = m.last_minute();
    assert_eq!(w.len(), WINDOW_SECONDS);
    assert_eq!(w[0].unix_secs, 1005);
    let last = w.last().unwrap();
    assert_eq!(last.unix_secs, 1000 + WINDOW_SECONDS as u64 + 4);
    assert_eq!(
        last.overhead[0],
        WINDOW_SECONDS as u64 + 4,
        "the increment, not the total"
    );
    assert_eq!(last.upstream[3], 2);
    assert!(w.iter().all(|s| s.upstream.iter().sum::<u64>() == 2));
}

#[test]
fn log_object_is_compact_json_with_nulls_for_unknown() {
    let mut out = Vec::new();
    write_log_object(
        &mut out,
        &HostSample {
            cpu_pressure: Some(0.0161),
            cpu_steal: Some(0.0),
            run_queue: Some(2),
            agent_cpu: None,
            ..HostSample::default()
        },
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        r#"{"cpu_pressure":0.0161,"cpu_steal":0.0,"run_queue":2,"agent_cpu":null}"#
    );
}

#[test]
fn the_system_sources_read_without_error_here() {
    // Whatever this machine has (PSI or not, cgroup v2 or not), sampling never fails and
    // /proc/stat is there on Linux.
    let mut s = Sampler::new(Sources::system());
    let first = s.sample();
    assert!(first.cpus >= 1 && first.run_queue.is_some(), "{first:?}");
    let second = s.sample();
    assert!(second.cpu_busy.is_some_and(|b| (0.0..=1.0).contains(&b)) || second.cpu_busy.is_none());
}

#[test]
fn timing_totals_sum_every_histogram_once() {
    let m = Metrics::new();
    let a = m.request(crate::telemetry::metrics::Direction::Outbound, "orders", "vm");
    // The same labels again (a reload rebuilds the clusters): the same histograms, counted once.
    let again = m.request(crate::telemetry::metrics::Direction::Outbound, "orders", "vm");
    let b = m.request(crate::telemetry::metrics::Direction::Inbound, "inbound", "vm");
    a.overhead.observe(Duration::from_micros(5));
    again.overhead.observe(Duration::from_micros(5));
    b.upstream.observe(Duration::from_secs(60));
    let t = m.timing_totals();
    assert_eq!(t.overhead[0], 2);
    assert_eq!(t.overhead.iter().sum::<u64>(), 2);
    assert_eq!(t.upstream[TIMING_BUCKETS - 1], 1);
}
