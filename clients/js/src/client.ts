// `Client`: connections that find and follow the leader, and the calls of waft.v1 with retries
// that never apply a command twice. The same features as the Rust crate `waft-client` and the
// Python package `waft_client`.

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import {
  ConfigError,
  Unavailable,
  Unreachable,
  WaftError,
  codeName,
  fromServiceError,
  fromStatus,
  retryableCall,
} from "./errors";
import type { ProtoGrpcType } from "./generated/api";
import type { ClusterClient } from "./generated/waft/v1/Cluster";
import type { DeployChunk } from "./generated/waft/v1/DeployChunk";
import type { DeployHeader } from "./generated/waft/v1/DeployHeader";
import type { DeployReply__Output } from "./generated/waft/v1/DeployReply";
import type { DeployStep__Output } from "./generated/waft/v1/DeployStep";
import type { ServiceInfo__Output } from "./generated/waft/v1/ServiceInfo";
import type { StatusReply__Output } from "./generated/waft/v1/StatusReply";
import type { SubmitReply__Output } from "./generated/waft/v1/SubmitReply";
import type { SubmitRequest } from "./generated/waft/v1/SubmitRequest";
import type { SubmitResult__Output } from "./generated/waft/v1/SubmitResult";
import type { WaftClient } from "./generated/waft/v1/Waft";
import type { WatchEvent__Output } from "./generated/waft/v1/WatchEvent";

export type { DeployStep__Output as DeployStep } from "./generated/waft/v1/DeployStep";
export type { ServiceInfo__Output as ServiceInfo } from "./generated/waft/v1/ServiceInfo";
export type { StatusReply__Output as StatusReply } from "./generated/waft/v1/StatusReply";

const definition = protoLoader.loadSync(join(__dirname, "..", "proto", "api.proto"), {
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const api = (grpc.loadPackageDefinition(definition) as unknown as ProtoGrpcType).waft.v1;

/** Modules go out in chunks of this many bytes. */
const CHUNK = 1 << 20;

/** A command or query: bytes, or a string sent as UTF-8. */
export type Payload = Buffer | Uint8Array | string;

/** How fresh a query's answer must be (docs/api.md, "Queries"). */
export type Consistency = "linearizable" | "lease" | "stale";

/** A submitted command's result: its log index and what the guest did with it (`ok`: the
 * reply's bytes; `rejected`, `trapped`: the guest's words). */
export interface Applied {
  index: number;
  outcome: "ok" | "rejected" | "trapped";
  value: Buffer | string;
  ok: boolean;
}

/** A query's answer: the index the node had applied and the guest's outcome. */
export interface Answer {
  appliedIndex: number;
  outcome: "ok" | "rejected" | "trapped";
  value: Buffer | string;
  ok: boolean;
}

/** What a deploy did. */
export interface Deployed {
  moduleSha256: string;
  /** The log index at which the module took over (0 for a dry run). */
  index: number;
  version: number;
  /** The service already ran this module with these limits: nothing changed. */
  unchanged: boolean;
  dryRun: boolean;
  /** With `verify`: what the determinism verifier found, a line each. */
  findings: string[];
}

/** What a watch reports: an applied command (`reply`, `rejected`, `failed`), a version change
 * (`version`), an event the guest emitted (`emitted`: its topic) or a timer (`fired`: its key). */
export interface Event {
  index: number;
  service: string;
  timestampMs: number;
  payload: Buffer;
  outcome: "reply" | "rejected" | "failed" | "version" | "emitted" | "fired";
  value: Buffer | string | number;
}

/** A deploy's settings beyond the service and module (docs/api.md, "Deploys"). */
export interface DeployOptions {
  /** Validate only; propose nothing. */
  dryRun?: boolean;
  /** The service's fuel per apply (0 or absent: the node's default). */
  fuelPerApply?: number;
  /** The service's memory limit in bytes (0 or absent: the node's default). */
  maxMemoryBytes?: number;
  /** Also run the determinism verifier; a finding refuses the deploy unless `force`. */
  verify?: boolean;
  force?: boolean;
  /** The whole deploy's deadline, milliseconds (default 300 000). */
  timeoutMs?: number;
  /** Told each step on the leader as it happens (each member's compile, the check, the
   * proposal): the deploy goes through `DeployWatched`. */
  onStep?: (step: DeployStep__Output) => void;
}

/** How the client connects, how long it waits and how often it tries. */
export interface ClientOptions {
  /** A token (`--token` or `--client-token` of the nodes), sent as `authorization: Bearer`. */
  token?: string;
  /** TLS: the CA that signed the nodes' certificates (PEM file), and optionally a client
   * certificate and key. */
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  /** Every call's deadline, milliseconds (default 10 000). */
  timeoutMs?: number;
  /** How long to wait for a node to answer when connecting, milliseconds (default 3 000). */
  connectTimeoutMs?: number;
  /** How many times a call the cluster cannot take now is made (default 10). */
  attempts?: number;
  /** Ask the node reached for the leader and talk to the leader (default true). */
  followLeader?: boolean;
}

/** One node's clients. */
interface Conn {
  address: string;
  waft: WaftClient;
  cluster: ClusterClient;
}

/** An exactly-once client session: its id and the next command's number. */
type Lane = [number, number];

/** What a node's call failed with, when it was one. */
function isServiceError(e: unknown): e is grpc.ServiceError {
  return e instanceof Error && typeof (e as grpc.ServiceError).code === "number";
}

/** What a failed attempt leaves to retry: an unreachable node or a retryable status. Anything
 * else is thrown, as the call's error. */
function retryFailure(e: unknown): WaftError {
  if (e instanceof Unreachable) {
    return e;
  }
  if (isServiceError(e)) {
    if (!retryableCall(e)) {
      throw fromServiceError(e);
    }
    return fromServiceError(e);
  }
  throw e;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

function bytes(payload: Payload): Buffer {
  return typeof payload === "string" ? Buffer.from(payload, "utf8") : Buffer.from(payload);
}

function applied(reply: SubmitReply__Output): Applied {
  const outcome = reply.outcome;
  if (outcome === undefined) {
    throw fromStatus("INTERNAL", "the node sent an empty reply");
  }
  const value = reply[outcome] as Buffer | string;
  return { index: reply.index, outcome, value, ok: outcome === "ok" };
}

function fromResult(result: SubmitResult__Output): Applied | WaftError {
  if (result.result === "reply" && result.reply) {
    return applied(result.reply);
  }
  if (result.result === "failure" && result.failure) {
    return fromStatus(codeName(result.failure.code), result.failure.message);
  }
  return fromStatus("INTERNAL", "the node sent an empty result");
}

/**
 * A client of a waft cluster. Give `Client.connect` any nodes' addresses (`host:port`).
 *
 * Every call has a deadline; a call the cluster cannot take now (an election, a node going
 * down) is made again on the next node that answers, 0.1 s later, then twice as long each time
 * up to 2 s, `attempts` times in all. Commands carry an exactly-once client session: one made
 * again after an unknown outcome is applied at most once. With `followLeader` (the default)
 * the client asks the node it reached for the leader and talks to the leader directly.
 */
export class Client {
  private current?: Conn;
  private opening?: Promise<Conn>;
  private readonly lanes: Lane[] = [];
  private readonly timeoutMs: number;
  private readonly connectTimeoutMs: number;
  private readonly attempts: number;
  private readonly followLeader: boolean;

  private constructor(
    readonly endpoints: string[],
    private readonly credentials: grpc.ChannelCredentials,
    private readonly tls: boolean,
    private readonly token: string | undefined,
    options: ClientOptions,
  ) {
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 3_000;
    this.attempts = Math.max(1, options.attempts ?? 10);
    this.followLeader = options.followLeader ?? true;
  }

  /** Connects to the first endpoint that answers (then to the leader it names). */
  static async connect(endpoints: string | string[], options: ClientOptions = {}): Promise<Client> {
    const list = (typeof endpoints === "string" ? [endpoints] : [...endpoints]).flatMap((e) =>
      e.split(",").map((s) => s.trim()),
    );
    if (list.length === 0 || list.some((e) => e === "")) {
      throw new ConfigError("no endpoint given");
    }
    for (const e of list) {
      const port = /^(?:\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d{1,5})$/.exec(e);
      if (!port || Number(port[1]) < 1 || Number(port[1]) > 65535) {
        throw new ConfigError(`endpoint ${JSON.stringify(e)} is not host:port`);
      }
    }
    let credentials = grpc.credentials.createInsecure();
    if (options.tlsCa) {
      const read = (path: string) => {
        try {
          return readFileSync(path);
        } catch (e) {
          throw new ConfigError(`cannot read TLS file ${path}: ${(e as Error).message}`);
        }
      };
      const ca = read(options.tlsCa);
      const key = options.tlsKey ? read(options.tlsKey) : null;
      const cert = options.tlsCert ? read(options.tlsCert) : null;
      if ((key === null) !== (cert === null)) {
        throw new ConfigError("a client certificate needs its key, and a key its certificate");
      }
      credentials = grpc.credentials.createSsl(ca, key, cert);
    }
    if (options.token !== undefined && !/^[\x21-\x7e]+$/.test(options.token)) {
      throw new ConfigError("a token is printable ASCII without spaces");
    }
    const client = new Client(list, credentials, Boolean(options.tlsCa), options.token, options);
    await client.conn();
    return client;
  }

  /** The address calls go to now. */
  get currentEndpoint(): string | undefined {
    return this.current?.address;
  }

  /** Closes the connection (a later call opens one again). */
  close(): void {
    const c = this.current;
    this.current = undefined;
    if (c) {
      c.waft.close();
      c.cluster.close();
    }
  }

  private metadata(): grpc.Metadata {
    const md = new grpc.Metadata();
    if (this.token !== undefined) {
      md.set("authorization", `Bearer ${this.token}`);
    }
    return md;
  }

  private options(timeoutMs = this.timeoutMs): grpc.CallOptions {
    return { deadline: Date.now() + timeoutMs };
  }

  private open(address: string): Conn {
    const options = {
      "grpc.max_receive_message_length": 64 << 20,
      "grpc.max_send_message_length": -1,
    };
    return {
      address,
      waft: new api.Waft(address, this.credentials, options),
      cluster: new api.Cluster(address, this.credentials, options),
    };
  }

  /** Clients of `address` that answered a Status call, and the reply (empty when the node
   * wants a token: it is there, and each call will say what it needs). */
  private async reach(address: string): Promise<[Conn, StatusReply__Output | undefined]> {
    const c = this.open(address);
    try {
      const status = await new Promise<StatusReply__Output>((resolve, reject) =>
        c.cluster.Status({}, this.metadata(), this.options(this.connectTimeoutMs), (e, r) =>
          e || !r ? reject(e) : resolve(r),
        ),
      );
      return [c, status];
    } catch (e) {
      if (
        isServiceError(e) &&
        (e.code === grpc.status.UNAUTHENTICATED || e.code === grpc.status.PERMISSION_DENIED)
      ) {
        return [c, undefined];
      }
      c.waft.close();
      c.cluster.close();
      let cause = isServiceError(e) ? e.details || codeName(e.code) : String(e);
      if (this.tls && !cause.toLowerCase().includes("refused")) {
        cause += " (does the node serve TLS, and did this CA sign its certificate?)";
      }
      throw new Unreachable(address, cause);
    }
  }

  /** The node calls go to: the current one, or the first endpoint that answers (then the
   * leader it names, if that answers). */
  private conn(): Promise<Conn> {
    if (this.current) {
      return Promise.resolve(this.current);
    }
    if (!this.opening) {
      this.opening = this.choose().finally(() => {
        this.opening = undefined;
      });
    }
    return this.opening;
  }

  private async choose(): Promise<Conn> {
    const down: Unreachable[] = [];
    for (const address of this.endpoints) {
      let reached: [Conn, StatusReply__Output | undefined];
      try {
        reached = await this.reach(address);
      } catch (e) {
        if (e instanceof Unreachable) {
          down.push(e);
          continue;
        }
        throw e;
      }
      let [chosen, status] = reached;
      const leader = status?.leader_addr;
      if (this.followLeader && leader && leader !== address) {
        try {
          const [atLeader] = await this.reach(leader);
          chosen.waft.close();
          chosen.cluster.close();
          chosen = atLeader;
        } catch {
          // The leader's address does not answer from here: stay on the node that did.
        }
      }
      this.current = chosen;
      return chosen;
    }
    // One error for the whole list, naming each node and why.
    if (down.length === 1) {
      throw down[0];
    }
    throw new Unreachable(
      down.map((d) => d.endpoint).join(", "),
      down.map((d) => `${d.endpoint}: ${d.cause}`).join("; "),
    );
  }

  /** Makes `call` until it succeeds, fails for good or the attempts run out. */
  private async retrying<T>(call: (c: Conn) => Promise<T>): Promise<T> {
    let delay = 100;
    for (let attempt = 1; ; attempt++) {
      let failure: WaftError;
      try {
        return await call(await this.conn());
      } catch (e) {
        failure = retryFailure(e);
      }
      if (attempt >= this.attempts) {
        throw failure;
      }
      this.close();
      await sleep(delay);
      delay = Math.min(delay * 2, 2000);
    }
  }

  private takeLane(): Lane {
    const lane = this.lanes.pop();
    if (lane) {
      return lane;
    }
    // An odd id below 2^53: exact as a JavaScript number.
    const id = Number(randomBytes(8).readBigUInt64BE() & ((1n << 52n) - 1n)) * 2 + 1;
    return [id, 1];
  }

  /** Applies one command exactly once (made again, with the same client session and number,
   * while its outcome is unknown). */
  async submit(service: string, payload: Payload): Promise<Applied> {
    const lane = this.takeLane();
    const request: SubmitRequest = {
      service,
      payload: bytes(payload),
      client_id: lane[0],
      sequence: lane[1],
    };
    try {
      const reply = await this.retrying(
        (c) =>
          new Promise<SubmitReply__Output>((resolve, reject) =>
            c.waft.Submit(request, this.metadata(), this.options(), (e, r) =>
              e || !r ? reject(e) : resolve(r),
            ),
          ),
      );
      return applied(reply);
    } finally {
      // Used up whether or not it applied: an unknown outcome may still apply it.
      lane[1] += 1;
      this.lanes.push(lane);
    }
  }

  /** Applies commands as one batch, in order, each exactly once: one result per command, an
   * `Applied` or the error that command got. */
  async submitBatch(service: string, payloads: Payload[]): Promise<(Applied | WaftError)[]> {
    const lane = this.takeLane();
    const commands: SubmitRequest[] = payloads.map((p) => ({
      service,
      payload: bytes(p),
      client_id: lane[0],
      sequence: lane[1]++,
    }));
    try {
      return await this.untilAnswered(commands, (todo) =>
        this.retrying(
          (c) =>
            new Promise<SubmitResult__Output[]>((resolve, reject) =>
              c.waft.SubmitBatch({ commands: todo }, this.metadata(), this.options(), (e, r) =>
                e || !r ? reject(e) : resolve(r.results),
              ),
            ),
        ),
      );
    } finally {
      // Given back only now: one batch in flight per client session.
      this.lanes.push(lane);
    }
  }

  private async untilAnswered(
    commands: SubmitRequest[],
    round: (todo: SubmitRequest[]) => Promise<SubmitResult__Output[]>,
  ): Promise<(Applied | WaftError)[]> {
    const answers: (Applied | WaftError | undefined)[] = commands.map(() => undefined);
    let todo = commands.map((_, i) => i);
    let delay = 100;
    for (let attempt = 1; attempt <= this.attempts && todo.length > 0; attempt++) {
      const last = attempt === this.attempts;
      let results: (Applied | WaftError)[];
      try {
        results = (await round(todo.map((i) => commands[i]))).map(fromResult);
      } catch (e) {
        if (!(e instanceof WaftError) || !e.retryable || last) {
          throw e;
        }
        results = todo.map(() => e);
      }
      const again: number[] = [];
      todo.forEach((i, k) => {
        const r = results[k] ?? new Unavailable("no answer");
        if (r instanceof WaftError && r.retryable && !last) {
          again.push(i);
        } else {
          answers[i] = r;
        }
      });
      todo = again;
      if (todo.length > 0) {
        await sleep(delay);
        delay = Math.min(delay * 2, 2000);
      }
    }
    return answers.map((a) => a ?? new Unavailable("no answer"));
  }

  /**
   * Applies many commands in order, exactly once each, pipelined over one `Session` stream:
   * batches of `batch` go out without waiting for the earlier ones' answers (at most
   * `inFlight` unanswered), each batch in a client session of its own. One result per
   * command: an `Applied` or the error that command got.
   */
  async submitMany(
    service: string,
    payloads: Payload[],
    { batch = 256, inFlight = 8 }: { batch?: number; inFlight?: number } = {},
  ): Promise<(Applied | WaftError)[]> {
    // Batch i goes in lane i % inFlight, numbered on: batch i + inFlight is sent only once
    // batch i is answered, so a lane never has two batches in flight.
    const count = Math.ceil(payloads.length / batch);
    const lanes = Array.from({ length: Math.max(1, Math.min(inFlight, count)) }, () =>
      this.takeLane(),
    );
    const batches: SubmitRequest[][] = [];
    for (let at = 0; at < payloads.length; at += batch) {
      const lane = lanes[batches.length % lanes.length];
      batches.push(
        payloads.slice(at, at + batch).map((p) => ({
          service,
          payload: bytes(p),
          client_id: lane[0],
          sequence: lane[1]++,
        })),
      );
    }
    const pending = new Map<number, [number, SubmitRequest][]>(
      batches.map((cmds, i) => [i, cmds.map((c, j) => [j, c] as [number, SubmitRequest])]),
    );
    const done = new Map<string, Applied | WaftError>();
    let delay = 100;
    try {
      for (let attempt = 1; attempt <= this.attempts && pending.size > 0; attempt++) {
        const last = attempt === this.attempts;
        // A retry sends one batch at a time.
        const window = attempt === 1 ? inFlight : 1;
        try {
          const c = await this.conn();
          await this.sessionRound(c, pending, done, window, last, (1 + pending.size) * this.timeoutMs);
        } catch (e) {
          if (e instanceof Unreachable) {
            if (last) throw e;
          } else if (isServiceError(e)) {
            // The stream broke: what it did not answer goes again.
            if (!retryableCall(e) || last) throw fromServiceError(e);
          } else {
            throw e;
          }
        }
        if (pending.size > 0) {
          this.close();
          await sleep(delay);
          delay = Math.min(delay * 2, 2000);
        }
      }
    } finally {
      this.lanes.push(...lanes);
    }
    const out: (Applied | WaftError)[] = [];
    batches.forEach((cmds, i) =>
      cmds.forEach((_, j) => out.push(done.get(`${i}:${j}`) ?? new Unavailable("no answer"))),
    );
    return out;
  }

  /** One Session stream: the pending batches in order, at most `window` unanswered. */
  private sessionRound(
    c: Conn,
    pending: Map<number, [number, SubmitRequest][]>,
    done: Map<string, Applied | WaftError>,
    window: number,
    last: boolean,
    timeoutMs: number,
  ): Promise<void> {
    const order = [...pending.keys()].sort((a, b) => a - b);
    return new Promise<void>((resolve, reject) => {
      const stream = c.waft.Session(this.metadata(), this.options(timeoutMs));
      let sent = 0;
      let answered = 0;
      const more = () => {
        while (sent < order.length && sent - answered < window) {
          const cmds = pending.get(order[sent]) ?? [];
          stream.write({ commands: cmds.map(([, command]) => command) });
          sent += 1;
          if (sent === order.length) {
            stream.end();
          }
        }
      };
      stream.on("data", (reply) => {
        const i = order[answered];
        answered += 1;
        const cmds = pending.get(i) ?? [];
        const retry: [number, SubmitRequest][] = [];
        cmds.forEach(([j, command], k) => {
          const result = reply.results[k];
          const r = result ? fromResult(result) : new Unavailable("no answer");
          if (r instanceof WaftError && r.retryable && !last) {
            retry.push([j, command]);
          } else {
            done.set(`${i}:${j}`, r);
          }
        });
        if (retry.length > 0) {
          pending.set(i, retry);
        } else {
          pending.delete(i);
        }
        more();
      });
      stream.on("error", reject);
      stream.on("end", resolve);
      more();
    });
  }

  /** Asks `service` at `consistency` (default linearizable). */
  async query(service: string, payload: Payload, consistency: Consistency = "linearizable"): Promise<Answer> {
    const request = {
      service,
      payload: bytes(payload),
      consistency: consistency.toUpperCase() as "LINEARIZABLE" | "LEASE" | "STALE",
    };
    const reply = await this.retrying(
      (c) =>
        new Promise<import("./generated/waft/v1/QueryReply").QueryReply__Output>((resolve, reject) =>
          c.waft.Query(request, this.metadata(), this.options(), (e, r) =>
            e || !r ? reject(e) : resolve(r),
          ),
        ),
    );
    const outcome = reply.outcome;
    if (outcome === undefined) {
      throw fromStatus("INTERNAL", "the node sent an empty answer");
    }
    const value = reply[outcome] as Buffer | string;
    return { appliedIndex: reply.applied_index, outcome, value, ok: outcome === "ok" };
  }

  /** Deploys the component `module` as `service`, streamed in 1 MiB chunks. Needs the cluster
   * token when the cluster has tokens. With `onStep`, each step on the leader is told as it
   * happens (against a node of an earlier release, the deploy goes on without steps). */
  async deploy(service: string, module: Buffer | Uint8Array, options: DeployOptions = {}): Promise<Deployed> {
    const header: DeployHeader = {
      service,
      size: module.length,
      dry_run: options.dryRun ?? false,
      fuel_per_apply: options.fuelPerApply ?? 0,
      max_memory_bytes: options.maxMemoryBytes ?? 0,
      verify: options.verify ?? false,
      force: options.force ?? false,
    };
    const chunks: DeployChunk[] = [{ header }];
    for (let at = 0; at < module.length; at += CHUNK) {
      chunks.push({ data: Buffer.from(module.subarray(at, at + CHUNK)) });
    }
    const timeoutMs = options.timeoutMs ?? 300_000;
    const onStep = options.onStep;
    const reply = await this.retrying(async (c) => {
      if (onStep) {
        try {
          return await this.deployWatched(c, chunks, timeoutMs, onStep);
        } catch (e) {
          if (!(isServiceError(e) && e.code === grpc.status.UNIMPLEMENTED)) {
            throw e;
          }
        }
      }
      return new Promise<DeployReply__Output>((resolve, reject) => {
        const call = c.waft.Deploy(this.metadata(), this.options(timeoutMs), (e, r) =>
          e || !r ? reject(e) : resolve(r),
        );
        chunks.forEach((chunk) => call.write(chunk));
        call.end();
      });
    });
    return {
      moduleSha256: reply.module_sha256,
      index: reply.index,
      version: reply.version,
      unchanged: reply.unchanged,
      dryRun: reply.dry_run,
      findings: reply.findings,
    };
  }

  private deployWatched(
    c: Conn,
    chunks: DeployChunk[],
    timeoutMs: number,
    onStep: (step: DeployStep__Output) => void,
  ): Promise<DeployReply__Output> {
    return new Promise<DeployReply__Output>((resolve, reject) => {
      const stream = c.waft.DeployWatched(this.metadata(), this.options(timeoutMs));
      let reply: DeployReply__Output | undefined;
      stream.on("data", (m) => {
        if (m.kind === "step" && m.step) {
          onStep(m.step);
        } else if (m.kind === "done" && m.done) {
          reply = m.done;
        }
      });
      stream.on("error", reject);
      stream.on("end", () =>
        reply
          ? resolve(reply)
          : reject(
              new Unavailable(
                "the deploy's progress ended before its reply; the deploy may have gone through: retry (deploying what already runs changes nothing)",
                "UNAVAILABLE",
              ),
            ),
      );
      chunks.forEach((chunk) => stream.write(chunk));
      stream.end();
    });
  }

  /** The services the cluster runs. */
  async services(): Promise<ServiceInfo__Output[]> {
    const reply = await this.retrying(
      (c) =>
        new Promise<import("./generated/waft/v1/ListServicesReply").ListServicesReply__Output>(
          (resolve, reject) =>
            c.waft.ListServices({}, this.metadata(), this.options(), (e, r) =>
              e || !r ? reject(e) : resolve(r),
            ),
        ),
    );
    return reply.services;
  }

  /** The contacted node's view of the cluster. */
  status(): Promise<StatusReply__Output> {
    return this.retrying(
      (c) =>
        new Promise<StatusReply__Output>((resolve, reject) =>
          c.cluster.Status({}, this.metadata(), this.options(), (e, r) =>
            e || !r ? reject(e) : resolve(r),
          ),
        ),
    );
  }

  /** Asks the leader to hand leadership to node `to` (admin). */
  async transferLeader(to: number): Promise<void> {
    await this.retrying(
      (c) =>
        new Promise<void>((resolve, reject) =>
          c.cluster.TransferLeader({ to }, this.metadata(), this.options(), (e) =>
            e ? reject(e) : resolve(),
          ),
        ),
    );
  }

  /**
   * The events of `service` (every service if absent) in log order, from `startIndex` (absent:
   * from now on). When its node goes away it opens again on a node the client finds, from the
   * index after the last event it yielded; `OutOfRange` if those events are no longer kept
   * (read the state with a query, then watch again). Stop it with `break`.
   */
  async *watch(service?: string, startIndex?: number): AsyncGenerator<Event> {
    let next = startIndex ?? 0;
    let failures = 0;
    for (;;) {
      let failure: WaftError;
      try {
        const c = await this.conn();
        const stream = c.waft.Watch({ service: service ?? "", start_index: next }, this.metadata());
        // A cancelled stream reports CANCELLED: expected once the watcher stops.
        stream.on("error", () => {});
        try {
          for await (const e of stream as AsyncIterable<WatchEvent__Output>) {
            failures = 0;
            next = e.index + 1;
            const outcome = e.outcome ?? "failed";
            yield {
              index: e.index,
              service: e.service,
              timestampMs: e.timestamp_ms,
              payload: e.payload,
              outcome,
              value: e[outcome] as Buffer | string | number,
            };
          }
        } finally {
          stream.cancel();
        }
        failure = new Unavailable("the node ended the watch", "UNAVAILABLE");
      } catch (e) {
        failure = retryFailure(e);
      }
      failures += 1;
      if (failures >= this.attempts) {
        throw failure;
      }
      this.close();
      await sleep(Math.min(100 * 2 ** failures, 2000));
    }
  }
}
