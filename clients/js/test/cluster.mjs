// Real clusters for the client's tests: `waft node` processes on 127.0.0.1, formed with the
// waft CLI. WAFT_BIN names the waft binary and WAFT_KV_WASM the kv example guest (the Rust test
// suite sets both when it runs this suite); without them, the repository's build outputs are
// used, and a missing one fails the tests (it never skips them).

import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { createServer, connect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");

function first(paths, what) {
  const found = paths.find((p) => p && existsSync(p));
  if (!found) {
    throw new Error(`${what} not found (tried ${paths.join(", ")}): build waft first (cargo build), or set its variable`);
  }
  return found;
}

export function waftBin() {
  return first(
    [process.env.WAFT_BIN, join(ROOT, "target", "debug", "waft"), join(ROOT, "target", "release", "waft")],
    "the waft binary (WAFT_BIN)",
  );
}

export function kvWasm() {
  return readFileSync(
    first(
      [
        process.env.WAFT_KV_WASM,
        join(ROOT, "target", "guests", "wasm32-wasip2", "release", "kv.wasm"),
        join(ROOT, "examples", "guests", "target", "wasm32-wasip2", "release", "kv.wasm"),
      ],
      "the kv example guest (WAFT_KV_WASM)",
    ),
  );
}

/** A port nothing listens on now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

function listening(port) {
  return new Promise((resolve) => {
    const socket = connect(port, "127.0.0.1");
    socket.on("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.on("error", () => resolve(false));
  });
}

/** Three `waft node` processes, formed into a cluster. */
export class Cluster {
  static async start({ nodeArgs = [], cliArgs = [] } = {}) {
    const c = new Cluster();
    c.bin = waftBin();
    c.dir = mkdtempSync(join(tmpdir(), "waft-js-"));
    c.nodeArgs = nodeArgs;
    c.cliArgs = cliArgs;
    c.addrs = [];
    for (let i = 0; i < 3; i++) {
      c.addrs.push(`127.0.0.1:${await freePort()}`);
    }
    c.procs = [];
    for (let i = 0; i < 3; i++) {
      await c.start(i);
    }
    c.cli(["cluster", "init"], c.addrs[0]);
    for (const i of [1, 2]) {
      c.cli(["cluster", "add-learner", String(i + 1), c.addrs[i]], c.addrs[0]);
    }
    c.cli(["cluster", "change-membership", "1", "2", "3"], c.addrs[0]);
    return c;
  }

  async start(i) {
    const log = openSync(join(this.dir, `n${i + 1}.log`), "a");
    this.procs[i] = spawn(
      this.bin,
      ["node", "--id", String(i + 1), "--listen", this.addrs[i], "--data-dir", join(this.dir, `n${i + 1}`), ...this.nodeArgs],
      { stdio: ["ignore", log, log] },
    );
    const port = Number(this.addrs[i].split(":")[1]);
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      if (await listening(port)) return;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`node ${i + 1} did not listen on ${this.addrs[i]}`);
  }

  cli(args, endpoint) {
    return execFileSync(this.bin, ["--endpoint", endpoint, ...this.cliArgs, ...args], { timeout: 60_000 }).toString();
  }

  /** SIGKILL: no goodbye. */
  async kill(i) {
    const p = this.procs[i];
    const exited = new Promise((r) => p.once("exit", r));
    p.kill("SIGKILL");
    await exited;
  }

  async stop() {
    await Promise.all(
      this.procs.map(
        (p) =>
          new Promise((resolve) => {
            if (!p || p.exitCode !== null || p.signalCode !== null) return resolve();
            p.once("exit", resolve);
            p.kill("SIGTERM");
            setTimeout(() => p.kill("SIGKILL"), 10_000).unref();
          }),
      ),
    );
    rmSync(this.dir, { recursive: true, force: true });
  }
}
