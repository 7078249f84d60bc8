//! The WASM tax: one kv `put` applied through the guest component, against the same work done
//! by native Rust on a BTreeMap, measured in the same run.
//!
//! Run with `cargo bench -p waft --bench guest_apply`. Rounds of each variant are interleaved
//! (native, single, batch, native, ...) so that noise from this shared machine hits all of
//! them alike; the report gives the median ns per operation and the ratio to native.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;
use waft::runtime::{ApplyCtx, Runtime, RuntimeConfig};

const OPS: usize = 20_000;
const ROUNDS: usize = 9;
const BATCH: usize = 64;

/// The same work the kv guest does for `put KEY VALUE`: parse the text, insert, reply "OK".
fn native_put(map: &mut BTreeMap<String, String>, command: &[u8]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(command).map_err(|_| "not UTF-8".to_owned())?;
    let (verb, rest) = text.split_once(' ').ok_or("no verb")?;
    if verb != "put" {
        return Err("unknown".to_owned());
    }
    let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
    map.insert(key.to_owned(), value.to_owned());
    Ok(b"OK".to_vec())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
    let bytes = std::fs::read(waft_testkit::guests::EXAMPLE_KV).expect("kv guest built");
    let module = runtime.load(&bytes).expect("kv loads");
    let commands: Vec<Vec<u8>> = (0..OPS)
        .map(|i| {
            format!(
                "put key{:06} value-{i:06}-0123456789abcdef",
                (i * 7919) % OPS
            )
            .into_bytes()
        })
        .collect();
    let ctx = |i: usize| ApplyCtx {
        index: i as u64 + 1,
        term: 1,
        timestamp_ms: 0,
    };
    let (mut native, mut single, mut batch) = (Vec::new(), Vec::new(), Vec::new());
    let mut fuel_per_put = 0;
    for _ in 0..ROUNDS {
        let mut map = BTreeMap::new();
        let t = Instant::now();
        for c in &commands {
            black_box(native_put(&mut map, black_box(c)).expect("put"));
        }
        native.push(t.elapsed().as_nanos() as f64 / OPS as f64);

        let mut guest = runtime.instantiate(&module, "bench").expect("instance");
        let t = Instant::now();
        for (i, c) in commands.iter().enumerate() {
            black_box(guest.apply(ctx(i), c).expect("put"));
        }
        single.push(t.elapsed().as_nanos() as f64 / OPS as f64);
        guest.apply(ctx(OPS), b"put fuel probe").expect("put");
        fuel_per_put = guest.last_fuel();

        let mut guest = runtime.instantiate(&module, "bench").expect("instance");
        let entries: Vec<(ApplyCtx, &[u8])> = commands
            .iter()
            .enumerate()
            .map(|(i, c)| (ctx(i), c.as_slice()))
            .collect();
        let t = Instant::now();
        for chunk in entries.chunks(BATCH) {
            for r in guest.apply_batch(chunk) {
                black_box(r.expect("put"));
            }
        }
        batch.push(t.elapsed().as_nanos() as f64 / OPS as f64);
    }
    let (n, s, b) = (median(native), median(single), median(batch));
    println!(
        "kv put, {OPS} ops x {ROUNDS} interleaved rounds, median ns/op (the checkpoint every 10,000 entries included)"
    );
    println!("  native BTreeMap           {n:>8.0} ns/op   1.00x");
    println!(
        "  guest apply (one call)    {s:>8.0} ns/op   {:.2}x native",
        s / n
    );
    println!(
        "  guest apply-batch ({BATCH:>3})   {b:>8.0} ns/op   {:.2}x native",
        b / n
    );
    println!("  fuel per put: {fuel_per_put} units");
    other_languages(&runtime, &module, &commands);
    history_costs(&bytes, &commands);
}

/// What instance histories cost (issue 17): the same puts under the default rebase policy and
/// under rebases every 1,000 entries, against a policy that never rebases (journal only), in
/// the same interleaved rounds; then, per language, opening an instance from a base state
/// (restore) and rebuilding one from a history (base + journal replay), against applying the
/// same commands.
fn history_costs(rust_kv: &[u8], commands: &[Vec<u8>]) {
    use waft::runtime::{CheckpointPolicy, ReplayForm};
    use waft_testkit::guests::{EXAMPLE_KV_JS, EXAMPLE_KV_PYTHON};
    let with_policy = |entries: usize| {
        Runtime::new(RuntimeConfig {
            checkpoints: CheckpointPolicy {
                entries,
                bytes: usize::MAX,
            },
            ..RuntimeConfig::default()
        })
        .expect("runtime")
    };
    let ctx = |i: usize| ApplyCtx {
        index: i as u64 + 1,
        term: 1,
        timestamp_ms: 1_700_000_000_000,
    };
    let mut guests: Vec<(&str, Vec<u8>, usize)> = vec![("rust", rust_kv.to_vec(), OPS)];
    for (name, built) in [("python", EXAMPLE_KV_PYTHON), ("js", EXAMPLE_KV_JS)] {
        match built {
            Ok(path) => guests.push((name, std::fs::read(path).expect("read guest"), 2_000)),
            Err(why) => println!("kv-{name}: history costs skipped ({why})"),
        }
    }
    let policies = [
        ("never", usize::MAX),
        ("default", 10_000),
        ("every 1,000", 1_000),
    ];
    let runtimes: Vec<Runtime> = policies.iter().map(|(_, e)| with_policy(*e)).collect();
    println!("instance histories: ns per put by rebase policy (same interleaved rounds), vs never");
    for (name, bytes, ops) in &guests {
        let modules: Vec<_> = runtimes
            .iter()
            .map(|rt| rt.load(bytes).expect("loads"))
            .collect();
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); policies.len()];
        let mut halves: Vec<Vec<(f64, f64)>> = vec![Vec::new(); policies.len()];
        let mut rebases = vec![0u64; policies.len()];
        let rounds = if *name == "rust" { ROUNDS } else { 3 };
        for round in 0..rounds {
            // Each round starts with another policy, so that no variant always runs first.
            for k in 0..policies.len() {
                let p = (round + k) % policies.len();
                let (rt, module) = (&runtimes[p], &modules[p]);
                let mut guest = rt.instantiate(module, "bench").expect("instance");
                let t = Instant::now();
                let mut half = 0.0;
                for (i, c) in commands[..*ops].iter().enumerate() {
                    if i == ops / 2 {
                        half = t.elapsed().as_nanos() as f64;
                    }
                    black_box(guest.apply(ctx(i), c).expect("put"));
                }
                let all = t.elapsed().as_nanos() as f64;
                times[p].push(all / *ops as f64);
                let n2 = (*ops / 2) as f64;
                halves[p].push((half / n2, (all - half) / n2));
                rebases[p] = guest.rebases();
            }
        }
        let never = median(times[0].clone());
        let row: Vec<String> = policies
            .iter()
            .zip(&times)
            .zip(&rebases)
            .map(|(((label, _), t), r)| {
                let m = median(t.clone());
                format!("{label}: {m:.0} ns ({:.2}x, {r} rebases)", m / never)
            })
            .collect();
        println!("  kv-{name} ({ops} puts): {}", row.join("; "));
        let split: Vec<String> = policies
            .iter()
            .zip(&halves)
            .map(|((label, _), h)| {
                let first = median(h.iter().map(|x| x.0).collect());
                let second = median(h.iter().map(|x| x.1).collect());
                format!("{label}: {first:.0} then {second:.0} ns")
            })
            .collect();
        println!(
            "    first half, then second half of the puts: {}",
            split.join("; ")
        );

        // Restore and replay, against applying the same commands, in the same rounds.
        let rt = &runtimes[0];
        let module = &modules[0];
        let n = (*ops).min(2_000);
        let mut source = rt.instantiate(module, "bench").expect("instance");
        for (i, c) in commands[..n].iter().enumerate() {
            source.apply(ctx(i), c).expect("put");
        }
        let base: std::sync::Arc<[u8]> = source.snapshot().expect("snapshot").into();
        // A history: the state after n puts as its base, then n more puts journaled.
        let mut from_base = rt
            .open(
                module,
                "bench",
                rt.limits().clone(),
                ctx(n),
                Some(base.clone()),
            )
            .expect("open");
        for (i, c) in commands[..n].iter().enumerate() {
            from_base.apply(ctx(n + 1 + i), c).expect("put");
        }
        let form: ReplayForm = from_base.replay_form();
        let (mut applies, mut restores, mut replays) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let mut fresh = rt.instantiate(module, "bench").expect("instance");
            let t = Instant::now();
            for (i, c) in commands[..n].iter().enumerate() {
                black_box(fresh.apply(ctx(i), c).expect("put"));
            }
            applies.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            black_box(
                rt.open(
                    module,
                    "bench",
                    rt.limits().clone(),
                    ctx(n),
                    Some(base.clone()),
                )
                .expect("open"),
            );
            restores.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            black_box(
                rt.from_replay(module, "bench", rt.limits().clone(), &form)
                    .expect("replay"),
            );
            replays.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (a, r, p) = (median(applies), median(restores), median(replays));
        println!(
            "  kv-{name}, state of {n} keys ({} bytes): {n} puts {a:.1} ms; open from the base \
             (instantiate + restore) {r:.1} ms = {:.2}x; rebuild from base + {n}-entry journal \
             {p:.1} ms = {:.2}x",
            base.len(),
            r / a,
            p / a
        );
    }
}

/// The same puts through the Python and JavaScript kv guests (when built), against the Rust
/// guest in the same rounds; plus what loading each component costs.
fn other_languages(
    runtime: &Runtime,
    rust: &std::sync::Arc<waft::runtime::GuestModule>,
    commands: &[Vec<u8>],
) {
    use waft_testkit::guests::{EXAMPLE_KV_JS, EXAMPLE_KV_PYTHON};
    const FEW: usize = 2_000;
    let ctx = |i: usize| ApplyCtx {
        index: i as u64 + 1,
        term: 1,
        timestamp_ms: 0,
    };
    let per_put = |module: &std::sync::Arc<waft::runtime::GuestModule>| -> (f64, u64) {
        let mut guest = runtime.instantiate(module, "bench").expect("instance");
        let t = Instant::now();
        for (i, c) in commands[..FEW].iter().enumerate() {
            black_box(guest.apply(ctx(i), c).expect("put"));
        }
        let ns = t.elapsed().as_nanos() as f64 / FEW as f64;
        guest.apply(ctx(FEW), b"put fuel probe").expect("put");
        (ns, guest.last_fuel())
    };
    for (name, built) in [("python", EXAMPLE_KV_PYTHON), ("js", EXAMPLE_KV_JS)] {
        let path = match built {
            Ok(path) => path,
            Err(why) => {
                println!("kv-{name}: skipped ({why})");
                continue;
            }
        };
        let bytes = std::fs::read(path).expect("read guest");
        // A runtime without a disk cache: the first load compiles.
        let fresh = Runtime::new(RuntimeConfig::default()).expect("runtime");
        let t = Instant::now();
        let module = fresh.load(&bytes).expect("loads");
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        drop(fresh.instantiate(&module, "bench").expect("instance"));
        let instantiate_ms = t.elapsed().as_secs_f64() * 1e3;
        let module = runtime.load(&bytes).expect("loads");
        let (mut theirs, mut ours) = (Vec::new(), Vec::new());
        let mut fuel = 0;
        for _ in 0..5 {
            let (ns, f) = per_put(&module);
            theirs.push(ns);
            fuel = f;
            ours.push(per_put(rust).0);
        }
        let (t, o) = (median(theirs), median(ours));
        println!(
            "kv-{name} ({:.1} MiB): compile {compile_ms:.0} ms, instantiate {instantiate_ms:.1} ms; \
             put {t:.0} ns/op = {:.1}x the Rust guest ({o:.0} ns/op), {fuel} fuel per put",
            bytes.len() as f64 / (1 << 20) as f64,
            t / o
        );
    }
}
