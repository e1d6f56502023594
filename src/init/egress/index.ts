export { createDnsServer, type DnsServer, type DnsServerOptions } from "./dns-server.ts";
export { createHttpProxy } from "./http-proxy.ts";
export { createSocks5Proxy, type Socks5Options } from "./socks5-proxy.ts";
export type { EgressEvent, EgressLog, EgressTarget, EgressVia, OpenConnection, ResolveName } from "./types.ts";
