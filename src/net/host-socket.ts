/**
 * A host-side connection into a VM: a Duplex joined to a kernel stream, shaped
 * enough like net.Socket that Node's http client (and its keep-alive Agent) and
 * the preview gateway can use it. Bytes go straight into the VM's socket table —
 * never through a real host port.
 */
import { Duplex } from "node:stream";
import { CreditBatcher, WindowedWriter } from "../guest/flow.ts";
import type { SocketTable } from "../kernel/socket-table.ts";
import type { StreamEnd, StreamOwner } from "../kernel/stream.ts";
import { AgentVmError } from "../errors.ts";

export class HostSocket extends Duplex {
  readonly remotePort: number;
  readonly remoteAddress = "127.0.0.1";
  readonly remoteFamily = "IPv4";
  readonly localAddress = "127.0.0.1";
  readonly localPort: number;
  connecting = false;
  #end: StreamEnd;
  #writer: WindowedWriter;
  #credit: CreditBatcher;
  #held = 0;
  #timer: NodeJS.Timeout | undefined;
  #timeoutMs = 0;
  #peerEnded = false;

  /**
   * Connects synchronously; throws ECONNREFUSED when nothing listens on `port`.
   * `allowHalfOpen: false` ends this side when the guest ends its side, as a
   * net.Socket does by default (what http.Agent needs to drop closed idle sockets).
   */
  constructor(sockets: SocketTable, port: number, options: { allowHalfOpen?: boolean } = {}) {
    super({ allowHalfOpen: options.allowHalfOpen ?? true, emitClose: true, autoDestroy: true });
    const owner: StreamOwner = {
      data: (chunk) => {
        this.#touch();
        if (this.push(chunk)) this.#credit.consumed(chunk.byteLength);
        else this.#held += chunk.byteLength;
      },
      end: () => {
        this.#peerEnded = true;
        this.push(null);
        this.read(0); // lets 'end' fire on a socket nobody reads (an idle keep-alive one)
      },
      close: (reset) => {
        this.#writer.abort(new AgentVmError("ECONNRESET", `the connection to port ${port} in the VM was closed`));
        // A reset after the guest's FIN only fails later writes, as on a real socket.
        if (reset && !this.destroyed && !this.#peerEnded) {
          this.destroy(new AgentVmError("ECONNRESET", `the service on port ${port} in the VM reset the connection`));
        }
      },
      credit: (bytes) => this.#writer.credit(bytes),
    };
    const { end, info } = sockets.connect("127.0.0.1", port, owner);
    this.#end = end;
    this.remotePort = port;
    this.localPort = info.localPort;
    this.#writer = new WindowedWriter((chunk) => end.write(chunk));
    this.#credit = new CreditBatcher((bytes) => end.credit(bytes));
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this.#touch();
    if (!this.#end.writable) {
      callback(new AgentVmError("EPIPE", `the connection to port ${this.remotePort} in the VM is closed`));
      return;
    }
    this.#writer.write(chunk, callback);
  }

  override _read(): void {
    if (this.#held > 0) {
      this.#credit.consumed(this.#held);
      this.#held = 0;
    }
  }

  override _final(callback: (error?: Error | null) => void): void {
    this.#end.end();
    callback();
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.#clearTimer();
    this.#credit.flush();
    this.#end.close();
    this.#writer.abort(error ?? new AgentVmError("EPIPE", "the connection was destroyed"));
    callback(error);
  }

  // net.Socket surface used by http.Agent and ClientRequest.
  setKeepAlive(): this {
    return this;
  }
  setNoDelay(): this {
    return this;
  }
  ref(): this {
    return this;
  }
  unref(): this {
    return this;
  }
  address(): { address: string; family: string; port: number } {
    return { address: this.localAddress, family: "IPv4", port: this.localPort };
  }

  setTimeout(ms: number, callback?: () => void): this {
    if (callback) this.once("timeout", callback);
    this.#timeoutMs = ms;
    this.#clearTimer();
    this.#touch();
    return this;
  }

  /** Restarts the idle timer; refresh() keeps the hot path free of timer allocations. */
  #touch(): void {
    if (this.#timeoutMs <= 0 || this.destroyed) return this.#clearTimer();
    if (this.#timer) {
      this.#timer.refresh();
      return;
    }
    this.#timer = setTimeout(() => this.emit("timeout"), this.#timeoutMs);
    this.#timer.unref();
  }

  #clearTimer(): void {
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = undefined;
  }
}
