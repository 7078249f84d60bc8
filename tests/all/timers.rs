//! Guest timers and events (`waft:fsm@0.2.0`) on real in-process clusters: timers fire once,
//! never early, across a leader change and a restart; their effects are undone with a rejected
//! or trapped call; the caps refuse with words and lose nothing; a hot-swap to a 0.1.0 guest
//! keeps them pending (reported) until a 0.2.0 version serves again; replicas stay identical,
//! pending timers included.

use crate::support::cluster::{TestCluster, test_settings};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::time::Duration;
use waft_client::proto::watch_event::Outcome as WatchOutcome;
use waft_client::{Client, Consistency, Outcome, Watch};
use waft_testkit::guests::{EXAMPLE_JOBS, TEST_LEGACY, TEST_TICKER};

async fn submit(client: &Client, service: &str, command: &str) -> Outcome {
    client
        .submit(service, command.as_bytes().to_vec())
        .await
        .unwrap_or_else(|e| panic!("{command}: {e}"))
        .outcome
}

async fn ok(client: &Client, service: &str, command: &str) -> String {
    match submit(client, service, command).await {
        Outcome::Ok(reply) => String::from_utf8_lossy(&reply).into_owned(),
        other => panic!("{command}: {other:?}"),
    }
}

async fn query(client: &Client, service: &str, request: &str) -> String {
    match client
        .query(
            service,
            request.as_bytes().to_vec(),
            Consistency::Linearizable,
        )
        .await
        .expect("query")
        .outcome
    {
        Outcome::Ok(reply) => String::from_utf8_lossy(&reply).into_owned(),
        other => panic!("query {request}: {other:?}"),
    }
}

/// Every running node's pending timers per service (count and earliest due), once all of them
/// applied the same index; asserts they agree, as the guests' states must.
async fn assert_identical(cluster: &TestCluster) -> BTreeMap<String, (usize, Option<u64>)> {
    let leader = cluster.wait_leader().await;
    let applied = cluster
        .node(leader)
        .state()
        .last_applied()
        .map_or(0, |l| l.index);
    cluster.wait_applied(applied).await;
    cluster.assert_identical().await;
    let mut first: Option<BTreeMap<String, (usize, Option<u64>)>> = None;
    for node in cluster.nodes.iter().flatten() {
        let timers: BTreeMap<String, (usize, Option<u64>)> = node
            .state()
            .services()
            .into_iter()
            .map(|s| (s.name, (s.pending_timers, s.next_timer_ms)))
            .collect();
        match &first {
            None => first = Some(timers),
            Some(f) => assert_eq!(f, &timers, "node {} has other timers", node.id()),
        }
    }
    first.expect("a node runs")
}

/// Events a watch delivers until it has `at_least` and then nothing more for `quiet` (30 s
/// at most).
async fn collect(
    watch: &mut Watch,
    at_least: usize,
    quiet: Duration,
) -> Vec<(String, String, u64)> {
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout(quiet, watch.next()).await {
            Ok(Some(Ok(e))) => {
                let (kind, detail) = match e.outcome {
                    Some(WatchOutcome::Emitted(topic)) => ("event", topic),
                    Some(WatchOutcome::Fired(key)) => ("timer", key),
                    other => ("other", format!("{other:?}")),
                };
                got.push((
                    format!("{kind} {detail}"),
                    String::from_utf8_lossy(&e.payload).into_owned(),
                    e.timestamp_ms,
                ));
            }
            Ok(Some(Err(e))) => panic!("the watch failed: {e}"),
            Ok(None) => panic!("the watch ended"),
            Err(_) if got.len() >= at_least => return got,
            Err(_) => assert!(
                std::time::Instant::now() < deadline,
                "only {} events: {got:?}",
                got.len()
            ),
        }
    }
}

async fn wait_for(client: &Client, service: &str, request: &str, want: &str) -> String {
    wait_until(client, service, request, want, |answer| {
        answer.contains(want)
    })
    .await
}

/// Queries `request` until its answer passes `ok` (15 s at most; `what` names it if not).
async fn wait_until(
    client: &Client,
    service: &str,
    request: &str,
    what: &str,
    ok: impl Fn(&str) -> bool,
) -> String {
    let mut last = String::new();
    for _ in 0..150 {
        last = query(client, service, request).await;
        if ok(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{request} never showed {what:?}; last: {last}");
}

/// Three nodes formed, a client on all of them, `module` deployed as `service`.
async fn cluster_with(service: &str, module: &str) -> (TestCluster, Client) {
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    // A deploy of a big guest (CPython or a JS engine inside) compiles it on every node; in
    // this process the compiles of every test share the compiler's threads, and on a slow
    // machine that took over two minutes: the bound is only against a hang.
    let client = Client::builder(cluster.addrs.clone())
        .deploy_timeout(Duration::from_secs(480))
        .connect()
        .await
        .expect("connects");
    client
        .deploy(service, &waft_testkit::wasm(module))
        .await
        .expect("deploys");
    (cluster, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jobs_visibility_timeout_fires_once_and_never_early_across_a_leader_change() {
    let (mut cluster, client) = cluster_with("jobs", EXAMPLE_JOBS).await;
    let mut watch = client.watch_events(Some("jobs"), "jobs/", Some(1));

    ok(&client, "jobs", r#"{"Enqueue":{"id":"j1","body":"one"}}"#).await;
    ok(&client, "jobs", r#"{"Enqueue":{"id":"j2","body":"two"}}"#).await;
    let delayed = ok(
        &client,
        "jobs",
        r#"{"Enqueue":{"id":"j3","body":"three","delay_ms":700}}"#,
    )
    .await;
    let j3_ready_at: u64 = delayed
        .parse()
        .expect("enqueue with a delay answers its time");
    let taken = ok(
        &client,
        "jobs",
        r#"{"Take":{"worker":"w1","visibility_ms":900}}"#,
    )
    .await;
    assert!(taken.contains(r#""id":"j1""#), "{taken}");
    let j1_visible_at: u64 = taken
        .split(r#""until_ms":"#)
        .nth(1)
        .and_then(|t| t.trim_end_matches('}').parse().ok())
        .expect("until_ms");
    let taken = ok(
        &client,
        "jobs",
        r#"{"Take":{"worker":"w2","visibility_ms":60000}}"#,
    )
    .await;
    assert!(taken.contains(r#""id":"j2""#), "{taken}");
    ok(&client, "jobs", r#"{"Ack":{"id":"j2","worker":"w2"}}"#).await;
    // A stranger cannot acknowledge a job, and the refusal changes nothing.
    match submit(&client, "jobs", r#"{"Ack":{"id":"j1","worker":"w9"}}"#).await {
        Outcome::Rejected(m) => assert!(m.contains("taken by \"w1\""), "{m}"),
        other => panic!("{other:?}"),
    }
    let timers = assert_identical(&cluster).await;
    assert_eq!(
        timers["jobs"].0, 2,
        "j1's visibility and j3's delay are pending"
    );

    // The leader goes while both timers are pending: the next leader delivers them.
    let leader = cluster.wait_leader().await;
    cluster.stop(leader).await;
    let stats = wait_for(
        &client,
        "jobs",
        r#""Stats""#,
        r#"{"ready":2,"delayed":0,"taken":0,"dead":0}"#,
    )
    .await;
    tracing::info!(%stats, "both timers fired");

    let events = collect(&mut watch, 8, Duration::from_secs(2)).await;
    let kinds: Vec<String> = events.iter().map(|(k, p, _)| format!("{k} {p}")).collect();
    assert_eq!(
        kinds,
        [
            "event jobs/enqueued j1",
            "event jobs/enqueued j2",
            "event jobs/enqueued j3",
            "event jobs/taken j1",
            "event jobs/taken j2",
            "event jobs/done j2",
            "event jobs/ready j3",
            "event jobs/expired j1",
        ][..],
        "each event once, in log order (the delay was due first)"
    );
    // Never early: the entries that delivered them are stamped at or after the due times.
    let at = |what: &str| {
        events
            .iter()
            .find(|(k, p, _)| format!("{k} {p}") == what)
            .expect(what)
            .2
    };
    assert!(at("event jobs/ready j3") >= j3_ready_at);
    assert!(at("event jobs/expired j1") >= j1_visible_at);

    // The stopped node comes back and catches up to the same state and timers.
    cluster.restart(leader).await;
    let again = ok(
        &client,
        "jobs",
        r#"{"Take":{"worker":"w3","visibility_ms":60000}}"#,
    )
    .await;
    assert!(again.contains(r#""attempt":"#), "{again}");
    let timers = assert_identical(&cluster).await;
    assert_eq!(timers["jobs"].0, 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timer_and_event_effects_follow_their_call_the_caps_refuse_and_a_0_1_guest_keeps_them_pending()
 {
    let (mut cluster, client) = cluster_with("t", TEST_TICKER).await;
    let mut fired_events = client.watch_events(Some("t"), "fired/", Some(1));

    // A timer in the past fires at once, once; one after a delay fires after it.
    ok(&client, "t", "set past 1 hello").await;
    ok(&client, "t", "after soon 300 later").await;
    wait_for(&client, "t", "fired", "soon").await;
    let fired = query(&client, "t", "fired").await;
    assert_eq!(fired.matches("past ").count(), 1, "{fired}");
    assert_eq!(fired.matches("soon ").count(), 1, "{fired}");

    // Effects of a rejected or trapped call do not survive it.
    match submit(&client, "t", "set-then-reject r").await {
        Outcome::Rejected(m) => assert!(m.contains("rejected after"), "{m}"),
        other => panic!("{other:?}"),
    }
    match submit(&client, "t", "set-then-panic p").await {
        Outcome::Trapped(m) => assert!(m.contains("panicked after setting"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        query(&client, "t", "notes").await,
        "",
        "the trapped call left nothing"
    );
    assert_eq!(
        assert_identical(&cluster).await["t"].0,
        0,
        "no timer from either"
    );

    // The caps: an oversized event, too many events, too many pending timers. Each is refused
    // as a whole (the state unchanged) with the reason, on every replica alike.
    match submit(&client, "t", "emit-big big 4200000").await {
        Outcome::Rejected(m) => assert!(m.contains("over the 4194304-byte limit"), "{m}"),
        other => panic!("{other:?}"),
    }
    match submit(&client, "t", "emit-n 1001 flood").await {
        Outcome::Rejected(m) => assert!(m.contains("more than 1000 events"), "{m}"),
        other => panic!("{other:?}"),
    }
    ok(&client, "t", "many 6000 a 600000").await;
    match submit(&client, "t", "many 6000 b 600000").await {
        Outcome::Rejected(m) => assert!(m.contains("limit of 10000"), "{m}"),
        other => panic!("{other:?}"),
    }
    ok(&client, "t", "cancel a0").await;
    ok(&client, "t", "note still-here").await;
    assert_eq!(assert_identical(&cluster).await["t"].0, 5999);

    // A timer whose delivery panics is dropped, reported; a periodic one fires twice.
    ok(&client, "t", "after boom 10 panic").await;
    ok(&client, "t", "after tick 10 again:50").await;
    wait_until(&client, "t", "fired", "tick fired twice", |f| {
        f.matches("tick ").count() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fired = query(&client, "t", "fired").await;
    assert_eq!(fired.matches("tick ").count(), 2, "{fired}");
    assert!(!fired.contains("boom"), "{fired}");

    // A follower restarted from a snapshot (format 6) has the same pending timers.
    let leader = cluster.wait_leader().await;
    let follower = (leader + 1) % 3;
    cluster
        .node(follower)
        .raft()
        .trigger()
        .snapshot()
        .await
        .expect("snapshot");
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.stop(follower).await;
    cluster.restart(follower).await;
    assert_eq!(assert_identical(&cluster).await["t"].0, 5999);

    // Hot-swap to a 0.1.0 guest: the timers stay pending (reported), none is delivered, not
    // even one that falls due under it; back to the 0.2.0 guest, that one fires. The 0.1.0
    // guest is first deployed as a service of its own, so that every node holds and compiled
    // it before the timer is set: a compile waits behind the big guests other tests compile in
    // this process (a minute, seen), the swap itself only for consensus. The timer's delay
    // leaves it 10 s; the test then waits past it.
    client
        .deploy("warm", &waft_testkit::wasm(TEST_LEGACY))
        .await
        .expect("deploys the 0.1.0 guest as a service of its own");
    let due = tokio::time::Instant::now() + Duration::from_secs(10);
    ok(&client, "t", "after during-legacy 10000").await;
    client
        .deploy("t", &waft_testkit::wasm(TEST_LEGACY))
        .await
        .expect("deploys the 0.1.0 guest");
    let pending = || async {
        let services = client.services().await.expect("services");
        let t = services.iter().find(|s| s.name == "t").expect("service t");
        (t.pending_timers, format!("{t:?}"))
    };
    let (n, t) = pending().await;
    assert_eq!(n, 6000, "pending timers are reported: {t}");
    tokio::time::sleep_until(due + Duration::from_millis(800)).await;
    let (n, t) = pending().await;
    assert_eq!(
        n, 6000,
        "a timer due under a 0.1.0 guest stays pending: {t}"
    );
    client
        .deploy("t", &waft_testkit::wasm(TEST_TICKER))
        .await
        .expect("deploys the 0.2.0 guest again");
    wait_for(&client, "t", "fired", "during-legacy").await;
    assert_eq!(query(&client, "t", "notes").await, "still-here");

    // The watch with a topic prefix saw the deliveries' events only, each once.
    let events = collect(&mut fired_events, 5, Duration::from_secs(1)).await;
    let topics: Vec<&str> = events.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(
        topics,
        [
            "event fired/past",
            "event fired/soon",
            "event fired/tick",
            "event fired/tick",
            "event fired/during-legacy",
        ]
    );
    assert_eq!(assert_identical(&cluster).await["t"].0, 5999);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_python_lock_expires_by_its_timer_once_across_a_leader_change() {
    let path = waft_testkit::guests::EXAMPLE_LOCKS_PYTHON
        .unwrap_or_else(|why| panic!("the Python lock service is not built: {why}"));
    let other = waft_testkit::guests::EXAMPLE_LOCKS_JS
        .unwrap_or_else(|why| panic!("the JavaScript lock service is not built: {why}"));
    lock_service(path, other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_javascript_lock_expires_by_its_timer_once_across_a_leader_change() {
    let path = waft_testkit::guests::EXAMPLE_LOCKS_JS
        .unwrap_or_else(|why| panic!("the JavaScript lock service is not built: {why}"));
    let other = waft_testkit::guests::EXAMPLE_LOCKS_PYTHON
        .unwrap_or_else(|why| panic!("the Python lock service is not built: {why}"));
    lock_service(path, other).await;
}

/// The fencing token in a lock service's grant (`{"granted":true,"token":N,...}`).
fn token_of(reply: &str) -> u64 {
    reply
        .split(r#""token":"#)
        .nth(1)
        .and_then(|t| t.split([',', '}']).next())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no token in {reply}"))
}

/// The lock service in `path` on three nodes: grants, a refused release, a released lock's
/// timer gone, the leader stopped while a lock's timer is pending and the lock expiring once;
/// then the service moved by hot-swap to the same service in the other language (`swap_to`),
/// holder and pending timer kept.
async fn lock_service(path: &str, swap_to: &str) {
    let (mut cluster, client) = cluster_with("locks", path).await;
    let mut watch = client.watch_events(Some("locks"), "locks/", Some(1));

    let first = ok(
        &client,
        "locks",
        r#"{"acquire":{"lock":"L","owner":"a","ttl_ms":10000}}"#,
    )
    .await;
    assert!(first.contains(r#""granted":true"#), "{first}");
    let busy = ok(
        &client,
        "locks",
        r#"{"acquire":{"lock":"L","owner":"b","ttl_ms":1000}}"#,
    )
    .await;
    assert!(busy.contains(r#""granted":false,"holder":"a""#), "{busy}");
    // A release by someone else, or with another token, is refused and changes nothing.
    match submit(
        &client,
        "locks",
        r#"{"release":{"lock":"L","owner":"b","token":1}}"#,
    )
    .await
    {
        Outcome::Rejected(m) => assert!(m.contains("does not hold"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A short lock taken and released: its timer goes with it.
    let other = ok(
        &client,
        "locks",
        r#"{"acquire":{"lock":"M","owner":"a","ttl_ms":600000}}"#,
    )
    .await;
    let token = token_of(&other);
    ok(
        &client,
        "locks",
        &format!(r#"{{"release":{{"lock":"M","owner":"a","token":{token}}}}}"#),
    )
    .await;
    assert_eq!(
        assert_identical(&cluster).await["locks"].0,
        1,
        "only L's timer"
    );

    // The leader goes while L's timer is pending; b gets the lock once it expired.
    let leader = cluster.wait_leader().await;
    cluster.stop(leader).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let granted = loop {
        let reply = ok(
            &client,
            "locks",
            r#"{"acquire":{"lock":"L","owner":"b","ttl_ms":600000}}"#,
        )
        .await;
        if reply.contains(r#""granted":true"#) {
            break reply;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "L never expired: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        token_of(&granted) > token_of(&first),
        "a new holder's fencing token is above the expired holder's: {first} then {granted}"
    );
    let events = collect(&mut watch, 5, Duration::from_secs(1)).await;
    let seen: Vec<String> = events.iter().map(|(k, p, _)| format!("{k} {p}")).collect();
    assert_eq!(
        seen,
        [
            "event locks/acquired L",
            "event locks/acquired M",
            "event locks/released M",
            "event locks/expired L",
            "event locks/acquired L",
        ][..],
        "every event once"
    );
    cluster.restart(leader).await;
    assert_eq!(assert_identical(&cluster).await["locks"].0, 1);

    // The same service in the other language takes over the state and the pending timer.
    client
        .deploy("locks", &waft_testkit::wasm(swap_to))
        .await
        .expect("hot-swaps to the other language");
    let holder = query(&client, "locks", r#"{"holder":{"lock":"L"}}"#).await;
    assert!(holder.contains(r#""owner":"b""#), "{holder}");
    let busy = ok(
        &client,
        "locks",
        r#"{"acquire":{"lock":"L","owner":"c","ttl_ms":1000}}"#,
    )
    .await;
    assert!(busy.contains(r#""granted":false,"holder":"b""#), "{busy}");
    assert_eq!(assert_identical(&cluster).await["locks"].0, 1);
    cluster.shutdown().await;
}
