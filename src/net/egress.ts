/**
 * Real network access for guests, when the policy allows it (DESIGN §3–4).
 *
 * Every outbound operation goes: policy decision → name resolution (once) →
 * egress floor on the resolved address → connect to exactly that address, so a
 * name cannot be re-resolved to something else between the check and the use
 * (no DNS rebinding). TLS is not terminated here: the guest runs TLS over the
 * relayed bytes, end to end.
 *
 * The floor refuses private, shared, link-local (cloud metadata), loopback,
 * unspecified and multicast addresses even under "allow", unless a rule names
 * the address or its CIDR. The host machine's own loopback is reachable only as
 * `host.agentvm.internal`, and only on ports a rule names.
 */
import { promises as dns } from "node:dns";
import net, { BlockList, isIP } from "node:net";
import { networkInterfaces } from "node:os";
import { AgentVmError } from "../errors.ts";
import { canonicalAddress, decide, mayAllowByAddress, namesAddressExplicitly, namesHostAndPort, type NetworkPolicy, type Operation } from "../policy/network-policy.ts";

export const HOST_ALIAS = "host.agentvm.internal";
/**
 * What `dns.lookup("host.agentvm.internal")` answers inside a VM. It is in the
 * benchmarking range (198.18.0.0/15), never routed; the server maps it back to
 * the host's loopback on connect.
 */
export const HOST_ALIAS_ADDRESS = "198.18.0.254";

const FLOOR = new BlockList();
for (const [base, bits] of [
  ["0.0.0.0", 8],
  ["10.0.0.0", 8],
  ["100.64.0.0", 10],
  ["127.0.0.0", 8],
  ["169.254.0.0", 16],
  ["172.16.0.0", 12],
  ["192.0.0.0", 24],
  ["192.168.0.0", 16],
  ["198.18.0.0", 15],
  ["224.0.0.0", 4],
  ["240.0.0.0", 4],
] as const) {
  FLOOR.addSubnet(base, bits, "ipv4");
}
for (const [base, bits] of [
  ["::", 96], // unspecified, loopback and IPv4-compatible (::127.0.0.1)
  ["fc00::", 7],
  ["fe80::", 10],
  ["ff00::", 8],
  ["64:ff9b::", 96],
  ["2002::", 16],
] as const) {
  FLOOR.addSubnet(base, bits, "ipv6");
}

export function isFloorAddress(address: string): boolean {
  const canonical = canonicalAddress(address);
  return canonical === undefined || FLOOR.check(canonical.address, canonical.family) || isHostInterfaceAddress(canonical.address, canonical.family);
}

/**
 * The host's own interface addresses reach the host's services whatever range
 * they are in (a public or documentation address on eth0 included), so they
 * are refused like its loopback. Read on each check: interfaces change.
 */
function isHostInterfaceAddress(address: string, family: "ipv4" | "ipv6"): boolean {
  const own = new BlockList();
  for (const infos of Object.values(networkInterfaces())) {
    for (const info of infos ?? []) own.addAddress(info.address, info.family === "IPv6" ? "ipv6" : "ipv4");
  }
  return own.check(address, family);
}

/**
 * The spelling rules are matched against: lowercased, without IPv6 brackets,
 * without trailing dots. `evil.com.` is the same name to a resolver as
 * `evil.com`, so it must be the same name to the policy, or a deny rule (and a
 * `*.suffix`) would be stepped around by adding a dot.
 */
export function normalizeHostname(hostname: string): string {
  return hostname.toLowerCase().replace(/^\[|\]$/g, "").replace(/\.+$/, "");
}

export interface Denial {
  time: number;
  vm: string;
  pid: number;
  operation: Operation | "udp";
  destination: string;
  rule: string;
  reason: string;
}

export interface EgressOptions {
  vmName: string;
  policy: NetworkPolicy;
  /** name → address, like /etc/hosts for the VM. */
  hosts: ReadonlyMap<string, string>;
  onDenied(denial: Denial): void;
  connectTimeoutMs?: number;
  /**
   * Connects (resolution included) in flight at once; each holds a host socket for up to
   * connectTimeoutMs, so a guest opening thousands towards a black hole would hold thousands.
   */
  maxConnectsInFlight?: number;
  /** Lookups in flight at once: each holds one of the host resolver's few threads. */
  maxLookupsInFlight?: number;
}

/** Defaults when the options leave them out (a VM's come from limits, src/vm.ts). */
const DEFAULT_IN_FLIGHT = 64;

export class Egress {
  readonly #options: EgressOptions;
  #connecting = 0;
  #lookingUp = 0;

  constructor(options: EgressOptions) {
    this.#options = options;
  }

  /** Answers a guest's dns.lookup for a name outside the VM. */
  async lookup(hostname: string, pid: number): Promise<{ address: string; family: 4 | 6 }[]> {
    const host = normalizeHostname(hostname);
    const limit = this.#options.maxLookupsInFlight ?? DEFAULT_IN_FLIGHT;
    if (this.#lookingUp >= limit) {
      this.#deny({ host }, pid, "dns", "limits.maxDnsInFlight", `the VM has ${limit} DNS lookups in flight already; retry once some answer, or raise limits.maxDnsInFlight`);
    }
    this.#lookingUp++;
    try {
      return await this.#lookup(hostname, host, pid);
    } finally {
      this.#lookingUp--;
    }
  }

  async #lookup(hostname: string, host: string, pid: number): Promise<{ address: string; family: 4 | 6 }[]> {
    if (host === HOST_ALIAS) {
      // Resolving the alias reveals nothing; it is answered when some rule names the alias with a port.
      if (!namesHostAndPort(this.#options.policy, HOST_ALIAS)) {
        this.#deny({ host }, pid, "dns", "default (deny)", `no rule names ${HOST_ALIAS}; add one such as patterns: ["${HOST_ALIAS}:5432"]`);
      }
      return [{ address: HOST_ALIAS_ADDRESS, family: 4 }];
    }
    this.#check({ operation: "dns", host }, pid, "dns");
    const mapped = this.#options.hosts.get(host);
    if (mapped) return [{ address: mapped, family: isIP(mapped) === 6 ? 6 : 4 }];
    try {
      const answers = await dns.lookup(host, { all: true });
      return answers.map((answer) => ({ address: answer.address, family: answer.family === 6 ? 6 : 4 }));
    } catch (error) {
      throw new AgentVmError("ENOTFOUND", `dns lookup ${hostname}: ${(error as NodeJS.ErrnoException).code ?? "failed"}; the name does not resolve from this server`);
    }
  }

  /** Opens a real TCP connection for a guest, after policy, resolution and floor checks. */
  async connect(hostname: string, port: number, pid: number): Promise<net.Socket> {
    const host = normalizeHostname(hostname);
    const limit = this.#options.maxConnectsInFlight ?? DEFAULT_IN_FLIGHT;
    if (this.#connecting >= limit) {
      this.#deny({ host, port }, pid, "connect", "limits.maxEgressInFlight", `the VM has ${limit} outbound connections being opened already; retry once some connect, or raise limits.maxEgressInFlight`);
    }
    this.#connecting++;
    try {
      return await this.#connect(host, port, pid);
    } finally {
      this.#connecting--;
    }
  }

  async #connect(host: string, port: number, pid: number): Promise<net.Socket> {
    const where = `${host}:${port}`;
    if (host === HOST_ALIAS || host === HOST_ALIAS_ADDRESS) {
      this.#check({ operation: "connect", host: HOST_ALIAS, port }, pid, "connect", () => namesHostAndPort(this.#options.policy, HOST_ALIAS, port), `${HOST_ALIAS} is reachable only on ports a rule names, e.g. patterns: ["${HOST_ALIAS}:${port}"]`);
      return this.#open("127.0.0.1", port, where);
    }
    let address = isIP(host) ? host : this.#options.hosts.get(host);
    if (address === undefined) {
      // A name the rules refuse is never sent to a resolver: the query itself would carry it out of the VM.
      const early = decide(this.#options.policy, { operation: "connect", host, port });
      if (!early.allow && (early.rule.startsWith("rules[") || !mayAllowByAddress(this.#options.policy, "connect", port))) {
        this.#deny({ host, port }, pid, "connect", early.rule, "the network policy does not allow it");
      }
      address = await this.#resolveOne(host);
    }
    const destination = { operation: "connect" as const, host, port, address };
    this.#check(destination, pid, "connect");
    if (isFloorAddress(address) && !namesAddressExplicitly(this.#options.policy, destination)) {
      this.#deny(
        destination,
        pid,
        "connect",
        "egress floor",
        `${address} is a private, link-local, loopback or otherwise internal address; it is refused even when the network is allowed, unless a rule names it (e.g. patterns: ["${address}"])`,
      );
    }
    return this.#open(address, port, where);
  }

  checkListen(port: number, pid: number): void {
    // Listening is on the VM's loopback: allowed unless a rule denies it.
    const decision = decide(this.#options.policy, { operation: "listen", host: "localhost", port });
    if (!decision.allow && decision.rule.startsWith("rules[")) this.#deny({ host: "localhost", port }, pid, "listen", decision.rule, "a listen rule denies this port");
  }

  /** UDP beyond the VM: decided like connect; relaying it is not supported yet. */
  checkUdp(hostname: string, port: number, pid: number): never {
    const host = normalizeHostname(hostname);
    this.#check({ operation: "connect", host, port }, pid, "udp");
    throw new AgentVmError("ENOTSUP", `send to ${host}:${port}: UDP to destinations outside the VM is not supported; use TCP`);
  }

  async #resolveOne(host: string): Promise<string> {
    try {
      // One answer, used for both the check and the connect.
      return (await dns.lookup(host)).address;
    } catch (error) {
      throw new AgentVmError("ENOTFOUND", `connect ${host}: ${(error as NodeJS.ErrnoException).code ?? "lookup failed"}; the name does not resolve from this server`);
    }
  }

  #check(
    destination: { operation: Operation; host: string; port?: number; address?: string },
    pid: number,
    label: Operation | "udp",
    extra?: () => boolean,
    extraReason?: string,
  ): void {
    const decision = decide(this.#options.policy, destination);
    if (!decision.allow) this.#deny(destination, pid, label, decision.rule, "the network policy does not allow it");
    if (extra && !extra()) this.#deny(destination, pid, label, decision.rule, extraReason ?? "no rule names this destination");
  }

  #deny(destination: { host: string; port?: number; address?: string }, pid: number, operation: Operation | "udp", rule: string, reason: string): never {
    const target = `${destination.host}${destination.port !== undefined ? `:${destination.port}` : ""}${destination.address && destination.address !== destination.host ? ` (${destination.address})` : ""}`;
    this.#options.onDenied({ time: Date.now(), vm: this.#options.vmName, pid, operation, destination: target, rule, reason });
    throw new AgentVmError("EACCES", `${operation} ${target} denied in VM ${this.#options.vmName} by ${rule}: ${reason}`);
  }

  #open(address: string, port: number, where: string): Promise<net.Socket> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host: address, port, timeout: this.#options.connectTimeoutMs ?? 30_000 });
      // Not read here: the socket is handed into the VM whole, and a byte read now would be lost.
      socket.pause();
      const fail = (error: NodeJS.ErrnoException) => {
        socket.destroy();
        const code = error.code === "ETIMEDOUT" ? "ETIMEDOUT" : error.code === "ECONNRESET" ? "ECONNRESET" : "ECONNREFUSED";
        reject(new AgentVmError(code, `connect ${where}: ${error.code ?? error.message}`));
      };
      socket.once("error", fail);
      socket.once("timeout", () => fail(Object.assign(new Error("timed out"), { code: "ETIMEDOUT" })));
      socket.once("connect", () => {
        socket.off("error", fail);
        socket.setTimeout(0);
        resolve(socket);
      });
    });
  }
}
