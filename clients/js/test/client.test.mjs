// The client scenario (the same as the Rust crate's and the Python package's) and the bad
// input it must name, against real `waft node` processes.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import waft from "../dist/index.js";
import { Cluster, freePort, kvWasm } from "./cluster.mjs";

const { Client, ConfigError, NotFound, PermissionDenied, TooLarge, Unauthenticated, Unreachable } = waft;

async function leaderOf(client) {
  const status = await client.status();
  assert.ok(status.leader_id, JSON.stringify(status));
  return status.leader_id - 1;
}

test("follows the leader across its death, applies once and resumes its watch", async () => {
  const cluster = await Cluster.start();
  try {
    const kv = kvWasm();
    const probe = await Client.connect(cluster.addrs[0], { followLeader: false });
    const leader = await leaderOf(probe);
    probe.close();
    const follower = (leader + 1) % 3;
    const client = await Client.connect([cluster.addrs[follower], cluster.addrs[leader], cluster.addrs[(leader + 2) % 3]]);
    assert.equal(client.currentEndpoint, cluster.addrs[leader], "found the leader through a follower");

    const steps = [];
    const deployed = await client.deploy("kv", kv, { onStep: (s) => steps.push(s.kind) });
    assert.equal(deployed.version, 1);
    assert.equal(deployed.unchanged, false);
    assert.deepEqual([steps[0], steps.at(-1)], ["KIND_RECEIVED", "KIND_PROPOSED"]);
    assert.equal(steps.filter((s) => s === "KIND_MEMBER_READY").length, 2, steps.join(" "));
    assert.ok((await client.deploy("kv", kv)).unchanged);

    const watch = client.watch("kv", 1);
    const seen = [];
    const first = await client.submit("kv", "put a 1");
    assert.ok(first.ok);
    assert.equal(first.value.toString(), "OK");
    while (seen.length === 0 || seen.at(-1).index < first.index) {
      const { value } = await watch.next();
      seen.push(value);
    }

    await cluster.kill(leader);
    const second = await client.submit("kv", "put b 2");
    assert.ok(second.ok && second.index > first.index);
    assert.notEqual(client.currentEndpoint, cluster.addrs[leader]);

    for (const consistency of ["linearizable", "lease"]) {
      const answer = await client.query("kv", "get b", consistency);
      assert.equal(answer.value.toString(), "2", consistency);
      assert.ok(answer.appliedIndex >= second.index);
    }
    // Stale: the node's own copy; it is the leader, which has applied both writes.
    assert.equal((await client.query("kv", "get a", "stale")).value.toString(), "1");

    const batch = await client.submitBatch("kv", Array.from({ length: 50 }, (_, i) => `put k${i} ${i}`));
    assert.ok(batch.every((r) => r.ok), JSON.stringify(batch));
    const many = await client.submitMany("kv", Array.from({ length: 300 }, (_, i) => `put m${i} ${i}`), { batch: 25, inFlight: 4 });
    assert.equal(many.length, 300);
    assert.ok(many.every((r) => r.ok));
    const refused = await client.submit("kv", "frobnicate");
    assert.equal(refused.outcome, "rejected");

    // The watch broke with the leader and resumed elsewhere: every command once, in order.
    while (seen.at(-1).index < refused.index) {
      const { value } = await watch.next();
      seen.push(value);
    }
    await watch.return();
    const indexes = seen.map((e) => e.index);
    assert.deepEqual(indexes, [...new Set(indexes)].sort((a, b) => a - b), "in order, once each");
    const payloads = seen.map((e) => e.payload.toString());
    for (const put of ["put a 1", "put b 2", "put k49 49", "put m299 299"]) {
      assert.equal(payloads.filter((p) => p === put).length, 1, put);
    }

    // Concurrent submits: each its own client session, each applied once.
    const results = (
      await Promise.all(
        Array.from({ length: 4 }, async (_, t) => {
          const out = [];
          for (let i = 0; i < 20; i++) out.push(await client.submit("kv", `put t${t}-${i} ${i}`));
          return out;
        }),
      )
    ).flat();
    assert.equal(results.length, 80);
    assert.ok(results.every((r) => r.ok));
    assert.equal(new Set(results.map((r) => r.index)).size, 80);
    const services = await client.services();
    assert.deepEqual(services.map((s) => s.name), ["kv"]);
    client.close();
  } finally {
    await cluster.stop();
  }
});

test("names what is wrong", async () => {
  const dead = `127.0.0.1:${await freePort()}`;
  await assert.rejects(Client.connect(dead, { attempts: 2, connectTimeoutMs: 1000 }), (e) => e instanceof Unreachable && e.endpoint === dead);
  await assert.rejects(Client.connect([]), ConfigError);
  // A malformed entry in a list is named before anything is dialled.
  await assert.rejects(Client.connect([dead, "127.0.0.1:notaport"]), (e) => e instanceof ConfigError && e.message.includes('"127.0.0.1:notaport"'));
  await assert.rejects(Client.connect("http://127.0.0.1:7001"), ConfigError);
  // Every endpoint down: one error naming each, not one per address.
  const dead2 = `127.0.0.1:${await freePort()}`;
  await assert.rejects(
    Client.connect([dead, dead2], { attempts: 1, connectTimeoutMs: 1000 }),
    (e) => e instanceof Unreachable && e.endpoint === `${dead}, ${dead2}` && e.cause.includes(`${dead}: `) && e.cause.includes(`${dead2}: `),
  );
  await assert.rejects(Client.connect(dead, { tlsCa: "/no/such/ca.pem" }), ConfigError);

  const kv = kvWasm();
  const secured = await Cluster.start({
    nodeArgs: ["--token", "cluster-token-1", "--client-token", "client-token-2"],
    cliArgs: ["--token", "cluster-token-1"],
  });
  try {
    const addr = secured.addrs[0];
    for (const token of [undefined, "wrong"]) {
      // The node is reachable; the call says what it needs.
      const c = await Client.connect(addr, { token });
      await assert.rejects(c.submit("kv", "put a 1"), Unauthenticated);
      await assert.rejects(c.deploy("kv", kv), Unauthenticated);
      c.close();
    }
    const client = await Client.connect(addr, { token: "client-token-2" });
    await assert.rejects(client.deploy("kv", kv), PermissionDenied);
    const admin = await Client.connect(addr, { token: "cluster-token-1" });
    await admin.deploy("kv", kv);
    admin.close();
    await assert.rejects(client.submit("kv", Buffer.alloc(5 << 20, 120)), TooLarge);
    await assert.rejects(client.submit("nope", "put a 1"), NotFound);
    client.close();
    // TLS on the client only: the plain-text node is unreachable over TLS, and the error says
    // what to check. A CA of its own, made by `waft certs`.
    const dir = mkdtempSync(join(tmpdir(), "waft-js-ca-"));
    execFileSync(secured.bin, ["certs", "--dir", dir, "--name", "someone"]);
    await assert.rejects(
      Client.connect(addr, { tlsCa: join(dir, "ca.pem"), attempts: 1, connectTimeoutMs: 2000 }),
      (e) => e instanceof Unreachable && e.cause.includes("TLS"),
    );
  } finally {
    await secured.stop();
  }
});

test("speaks TLS to a TLS cluster and presents its token", async () => {
  const kv = kvWasm();
  const dir = mkdtempSync(join(tmpdir(), "waft-js-tls-"));
  const bin = (await import("./cluster.mjs")).waftBin();
  execFileSync(bin, ["certs", "--dir", dir, "--name", "node"]);
  execFileSync(bin, ["certs", "--dir", dir, "--name", "me"]);
  const ca = join(dir, "ca.pem");
  const tls = ["--tls-ca", ca, "--tls-cert", join(dir, "node.pem"), "--tls-key", join(dir, "node-key.pem")];
  const cluster = await Cluster.start({
    nodeArgs: [...tls, "--token", "cluster-secret-js", "--client-token", "client-secret-js"],
    cliArgs: ["--tls-ca", ca, "--token", "cluster-secret-js"],
  });
  try {
    const admin = await Client.connect(cluster.addrs, { tlsCa: ca, token: "cluster-secret-js" });
    await admin.deploy("kv", kv);
    admin.close();
    // A client certificate too (the nodes accept one signed by their CA).
    const client = await Client.connect(cluster.addrs, {
      tlsCa: ca,
      tlsCert: join(dir, "me.pem"),
      tlsKey: join(dir, "me-key.pem"),
      token: "client-secret-js",
    });
    assert.ok((await client.submit("kv", "put secret 42")).ok);
    assert.equal((await client.query("kv", "get secret")).value.toString(), "42");
    client.close();
    // Plain text to a TLS node: unreachable, in words.
    await assert.rejects(
      Client.connect(cluster.addrs[0], { attempts: 1, connectTimeoutMs: 2000 }),
      Unreachable,
    );
    await assert.rejects(Client.connect(cluster.addrs[0], { tlsCa: ca, tlsCert: join(dir, "me.pem") }), ConfigError);
  } finally {
    await cluster.stop();
  }
});
