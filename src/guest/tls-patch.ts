/**
 * TLS over the kernel: `tls.connect` without a transport socket would open a
 * real TCP handle, which the permission model refuses. Here it gets a kernel
 * socket (net.connect, so the policy and the VM's loopback apply) and runs TLS
 * over it inside the guest — certificates are checked by the guest, end to end.
 * https.Agent and fetch reach TLS through tls.connect, so they follow.
 */
import net from "node:net";
import tls from "node:tls";

export function installTlsPatch(): void {
  const original = tls.connect as (options: tls.ConnectionOptions, callback?: () => void) => tls.TLSSocket;
  const patched = function connect(...args: unknown[]): tls.TLSSocket {
    const callback = typeof args.at(-1) === "function" ? (args.pop() as () => void) : undefined;
    let options: tls.ConnectionOptions;
    if (typeof args[0] === "object" && args[0] !== null) options = { ...(args[0] as tls.ConnectionOptions) };
    else {
      options = { ...((typeof args[1] === "object" ? args[1] : args[2]) as tls.ConnectionOptions | undefined) };
      options.port = Number(args[0]);
      if (typeof args[1] === "string") options.host = args[1];
    }
    if (options.socket || options.path) return original.call(tls, options, callback);
    const host = options.host ?? "localhost";
    const socket = net.connect({ host, port: Number(options.port ?? 443) });
    const servername = options.servername ?? (net.isIP(host) ? undefined : host);
    return original.call(tls, { ...options, socket, ...(servername ? { servername } : {}) }, callback);
  };
  (tls as unknown as { connect: typeof patched }).connect = patched;
}
