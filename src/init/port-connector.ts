/**
 * Connects to a port on the VM's own loopback, for the server: the connected
 * socket is then handed to the server whole (its file descriptor), so vmFetch
 * and previews speak to the program directly, with no relay in init.
 */
import { connect, type Socket } from "node:net";

/** IPv4 first, then IPv6: a program listening on `::1` only is reachable too. */
export async function connectToPort(port: number): Promise<Socket> {
  try {
    return await connectTo(port, "127.0.0.1");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ECONNREFUSED") throw error;
    return connectTo(port, "::1").catch(() => Promise.reject(error));
  }
}

function connectTo(port: number, host: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect({ port, host, noDelay: true });
    // Never read here: every byte belongs to the server once the handle moves.
    socket.pause();
    socket.once("connect", () => {
      socket.removeAllListeners("error");
      // A port inside the VM's ephemeral range can be connected to itself (TCP simultaneous open:
      // the kernel picked the very port as the source while nothing listened): that is no listener.
      if (socket.localPort === socket.remotePort && socket.localAddress === socket.remoteAddress) {
        socket.destroy();
        return reject(Object.assign(new Error(`connect ECONNREFUSED ${host}:${port}`), { code: "ECONNREFUSED" }));
      }
      resolve(socket);
    });
    socket.once("error", reject);
  });
}
