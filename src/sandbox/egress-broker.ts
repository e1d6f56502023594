/**
 * The server's end of a VM's egress (DESIGN §1 "Egress goes through policy"):
 * what the control channel calls when init asks `{ type: "egress.open", host,
 * port }` or `{ type: "egress.resolve", name, family }`. Every request from the
 * VM is untrusted input, so it is validated here, before Egress decides and
 * before any socket or DNS query exists; the decision, the one resolution, the
 * egress floor and the host alias stay Egress's (src/net/egress.ts).
 */
import type net from "node:net";
import { isIP } from "node:net";
import { invalidArgument } from "../errors.ts";
import type { Egress } from "../net/egress.ts";

const MAX_NAME = 253;
// LDH labels (and `_`, which real names use) of 1-63 characters: no controls, spaces, empty labels or URL delimiters.
const HOST_NAME = /^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$/;

export class EgressBroker {
  readonly #egress: Egress;

  constructor(egress: Egress) {
    this.#egress = egress;
  }

  /**
   * A policy-checked, connected TCP socket to `host:port`. `host` is a name,
   * an IPv4 address or an IPv6 address with or without brackets;
   * `host.agentvm.internal` and its alias address reach the host's loopback on
   * ports a rule names, as Egress decides.
   */
  async open(host: unknown, port: unknown, pid: unknown = 0): Promise<net.Socket> {
    return this.#egress.connect(normalizeHost(host, "egress.open host"), validPort(port), validPid(pid));
  }

  /** UDP beyond the VM is not relayed: always EACCES, decided (and audited) like a connect. */
  udp(host: unknown, port: unknown, pid: unknown = 0): never {
    return this.#egress.checkUdp(normalizeHost(host, "egress.udp host"), validPort(port), validPid(pid));
  }

  /** The addresses of `name` in `family`, when policy allows resolving it; [] when it has none there. */
  async resolve(name: unknown, family: unknown, pid: unknown = 0): Promise<string[]> {
    const host = normalizeHost(name, "egress.resolve name");
    if (family !== 4 && family !== 6) throw invalidArgument(`egress.resolve family must be 4 or 6, got ${String(family)}`);
    const answers = await this.#egress.lookup(host, validPid(pid));
    return answers.filter((answer) => answer.family === family).map((answer) => answer.address);
  }
}

/** Lowercased, brackets and trailing dots removed: the spelling the policy's patterns use (Egress normalizes the same way). */
function normalizeHost(value: unknown, field: string): string {
  if (typeof value !== "string") throw invalidArgument(`${field} must be a string, got ${typeof value}`);
  const bracketed = /^\[([^\]]*)\]$/.exec(value);
  if (bracketed) {
    if (isIP(bracketed[1]!) !== 6) throw invalidArgument(`${field} ${JSON.stringify(value)}: only an IPv6 address may be in brackets`);
    return bracketed[1]!.toLowerCase();
  }
  if (isIP(value) === 6) return value.toLowerCase();
  const host = value.toLowerCase().replace(/\.+$/, "");
  if (host.length === 0 || host.length > MAX_NAME) throw invalidArgument(`${field} must be 1-${MAX_NAME} characters, got ${value.length}`);
  if (isIP(host) === 4) return host;
  if (!HOST_NAME.test(host)) throw invalidArgument(`${field} ${JSON.stringify(value.slice(0, 80))} is not a host name (letters, digits, - and _ in dot-separated labels of up to 63)`);
  return host;
}

function validPort(value: unknown): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < 1 || value > 65535) {
    throw invalidArgument(`egress.open port must be an integer 1-65535, got ${String(value)}`);
  }
  return value;
}

function validPid(value: unknown): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < 0) throw invalidArgument(`egress pid must be a non-negative integer, got ${String(value)}`);
  return value;
}
