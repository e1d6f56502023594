/**
 * Names and addresses that mean "this VM's loopback" (DESIGN §3 "Socket table").
 * A VM has one port space shared by IPv4 and IPv6, as a dual-stack socket has.
 */

const BIND_ANY_OR_LOOPBACK = new Set(["", "127.0.0.1", "::1", "localhost", "0.0.0.0", "::", "::ffff:127.0.0.1"]);

/** True when a bind address is one the VM's loopback answers to. */
export function isLoopbackBind(host: string | undefined): boolean {
  return host === undefined || BIND_ANY_OR_LOOPBACK.has(host.toLowerCase());
}

/** True when a connect destination is the VM's own loopback. */
export function isLoopbackDestination(host: string | undefined): boolean {
  if (host === undefined) return true;
  const name = host.toLowerCase().replace(/^\[|\]$/g, "");
  if (BIND_ANY_OR_LOOPBACK.has(name) || name.endsWith(".localhost")) return true;
  return /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(name) || /^::ffff:127\./.test(name);
}

/** The address family a loopback name reports, as Node would. */
export function loopbackAddress(host: string | undefined): { address: string; family: "IPv4" | "IPv6" } {
  const name = (host ?? "").toLowerCase();
  return name === "::1" || name === "::" ? { address: "::1", family: "IPv6" } : { address: "127.0.0.1", family: "IPv4" };
}
