/**
 * init's egress servers on the VM's loopback (see protocol.ts EGRESS_PORTS).
 * Every port is bound before init reports ready, so a program that starts at
 * once finds them; the HTTP proxy, the SOCKS5 proxy and the Node guest
 * service are loaded on their first connection (measured: ~20 ms of each
 * VM's start-up, a few MB of init's memory, for VMs that never reach out).
 * A connection that arrives while its server loads waits, paused. The DNS
 * server is made at once (UDP has no connection to hold while it loads) but
 * loads its packet codec with the first question.
 */
import { createServer, type Server, type Socket } from "node:net";
import { createDnsServer } from "./egress/dns-server.ts";
import type { OpenConnection, ResolveName } from "./egress/types.ts";
import { EGRESS_PORTS } from "./protocol.ts";

export async function startEgressServers(open: OpenConnection, resolve: ResolveName): Promise<void> {
  await Promise.all([
    createDnsServer(resolve).listen(EGRESS_PORTS.dns, "127.0.0.1"),
    listenLazily(EGRESS_PORTS.http, async () => (await import("./egress/http-proxy.ts")).createHttpProxy(open)),
    listenLazily(EGRESS_PORTS.socks5, async () => (await import("./egress/socks5-proxy.ts")).createSocks5Proxy(open)),
    listenLazily(EGRESS_PORTS.node, async () => (await import("./guest-service.ts")).createGuestService(open, resolve)),
  ]);
}

/** A listener whose connections go to `load()`'s server, which is made on the first one. */
function listenLazily(port: number, load: () => Promise<Server>): Promise<void> {
  let server: Promise<Server> | undefined;
  // The options of the servers behind it: half-open connections, no Nagle delay.
  const listener = createServer({ pauseOnConnect: true, allowHalfOpen: true, noDelay: true }, (socket: Socket) => {
    server ??= load();
    server.then(
      (target) => {
        target.emit("connection", socket);
        socket.resume();
      },
      () => socket.destroy(),
    );
  });
  return new Promise((ready, fail) => {
    listener.once("error", fail);
    listener.listen(port, "127.0.0.1", () => ready());
  });
}
