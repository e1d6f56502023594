/**
 * The contract between init's egress servers (in the VM) and the server that
 * decides and opens real connections (outside it). init never opens a socket
 * beyond the VM: it asks, and gets back a connected stream or an error.
 *
 * Errors on both functions carry a `code` ("EACCES" for a policy denial,
 * "ECONNREFUSED", "ENOTFOUND", "ETIMEDOUT", "INVALID_ARGUMENT", …) and a
 * message naming the destination and, for a denial, the rule. The servers
 * compare `code`, never `instanceof`: the error crosses a process boundary.
 */
import type { Duplex } from "node:stream";

/** Which of init's servers asked: the audit log and error pages tell them apart. */
export type EgressVia = "http" | "connect" | "socks5" | "node" | "udp";

export interface EgressTarget {
  /** A name, an IPv4 address or an IPv6 address (without brackets), as the guest gave it. */
  host: string;
  port: number;
  via: EgressVia;
  /** The VM pid that asked, when known (the Node preload says), for the audit. */
  pid?: number;
}

export type OpenConnection = (target: EgressTarget) => Promise<Duplex>;

/** `pid`: the VM pid that asked, when known, for the audit. */
export type ResolveName = (name: string, family: 4 | 6, pid?: number) => Promise<string[]>;

/** One line of what the egress servers did, for init's log; never required. */
export interface EgressEvent {
  via: EgressVia;
  host: string;
  port: number;
  outcome: "opened" | "denied" | "failed";
  code?: string;
  message?: string;
}

export type EgressLog = (event: EgressEvent) => void;

/** The `code` of an error from OpenConnection/ResolveName, or "EIO" when it has none. */
export function errorCode(error: unknown): string {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === "string" ? code : "EIO";
}

export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
