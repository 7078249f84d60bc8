// The errors a call ends with: each names its cause; none is a hang (every call has a
// deadline). They mirror the Rust crate's `waft_client::Error` and the Python package's.

import { status as Code, type ServiceError } from "@grpc/grpc-js";

/** Base of every waft client error. `code` is the gRPC status code's name, when there is one. */
export class WaftError extends Error {
  /** Whether the same call may succeed on another node or a moment later. */
  readonly retryable: boolean = false;
  constructor(
    message: string,
    readonly code?: string,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

/** The client's own settings are unusable (no endpoint, unreadable TLS files). */
export class ConfigError extends WaftError {}

/** No node could be reached at `endpoint` (nothing listens, or TLS on one side only). */
export class Unreachable extends WaftError {
  override readonly retryable = true;
  constructor(
    readonly endpoint: string,
    readonly cause: string,
  ) {
    super(`cannot reach a waft node at ${endpoint}: ${cause}`, "UNAVAILABLE");
  }
}

/** The node wants a token, or a different one. */
export class Unauthenticated extends WaftError {}
/** The token may not make this call (an admin call with a client token). */
export class PermissionDenied extends WaftError {}
/** A malformed request (an empty command, a module that is not a guest). */
export class InvalidArgument extends WaftError {}
/** What the call names does not exist (a service, a version). */
export class NotFound extends WaftError {}
/** A command, batch or message over the node's limits. */
export class TooLarge extends WaftError {}
/** A watch from an index whose events the node no longer keeps. */
export class OutOfRange extends WaftError {}
/** The cluster is in no state to do it now. */
export class FailedPrecondition extends WaftError {}
/** No leader answered after every attempt. A submit's outcome is unknown: submitting it again
 * with the same client applies it at most once. */
export class Unavailable extends WaftError {
  override readonly retryable = true;
}
/** The call's deadline passed. */
export class Timeout extends WaftError {}
/** Anything else the node answered. */
export class ServerError extends WaftError {}

const BY_CODE: Record<string, new (message: string, code?: string) => WaftError> = {
  UNAUTHENTICATED: Unauthenticated,
  PERMISSION_DENIED: PermissionDenied,
  INVALID_ARGUMENT: InvalidArgument,
  NOT_FOUND: NotFound,
  RESOURCE_EXHAUSTED: TooLarge,
  FAILED_PRECONDITION: FailedPrecondition,
  UNAVAILABLE: Unavailable,
  DEADLINE_EXCEEDED: Timeout,
};

/** The name of a gRPC status code (`NOT_FOUND`). */
export function codeName(code: number): string {
  return (Code as unknown as Record<number, string>)[code] ?? "UNKNOWN";
}

/** The error for a gRPC status (its code's name and details). */
export function fromStatus(code: string, message: string): WaftError {
  const cls =
    code === "OUT_OF_RANGE"
      ? message.includes("too large")
        ? TooLarge
        : OutOfRange
      : (BY_CODE[code] ?? ServerError);
  return new cls(`${message} (${code})`, code);
}

/** The error for a failed call. */
export function fromServiceError(e: ServiceError): WaftError {
  return fromStatus(codeName(e.code), e.details || e.message);
}

/** Whether a failed call may succeed on another node or a moment later: no leader, a dead
 * connection, a node stopping. */
export function retryableCall(e: ServiceError): boolean {
  if (e.code === Code.UNAVAILABLE) {
    return true;
  }
  const details = (e.details || "").toLowerCase();
  return (
    (e.code === Code.UNKNOWN || e.code === Code.CANCELLED || e.code === Code.INTERNAL) &&
    (details.includes("transport") || details.includes("connection") || details.includes("socket"))
  );
}
