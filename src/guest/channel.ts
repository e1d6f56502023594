/**
 * One framed pipe between a guest and the kernel. Used on both sides: the guest
 * wraps fd 3, the kernel wraps the child's fourth stdio pipe.
 *
 * Frames written in one tick are corked into one writev, so a request and its
 * credit, or a response head and body, cost one system call. Writes never wait:
 * the stream windows (see protocol.ts) bound what can be queued here.
 */
import type { Duplex } from "node:stream";
import { FrameDecoder, type Frame } from "./protocol.ts";

export class FrameChannel {
  readonly #pipe: Duplex;
  readonly #decoder: FrameDecoder;
  #corked = false;
  #closed = false;
  #onClose: ((error?: Error) => void) | undefined;

  constructor(pipe: Duplex, onFrame: (frame: Frame) => void, onClose?: (error?: Error) => void) {
    this.#pipe = pipe;
    this.#onClose = onClose;
    this.#decoder = new FrameDecoder();
    pipe.on("data", (chunk: Buffer) => {
      let frames: Frame[];
      try {
        frames = this.#decoder.push(chunk);
      } catch (error) {
        this.close(error as Error);
        return;
      }
      // Handlers run outside the try: an exception there (on the guest side, the
      // user's program) must surface as itself, not as a broken channel.
      for (const frame of frames) if (!this.#closed) onFrame(frame);
    });
    pipe.on("error", (error) => this.close(error));
    pipe.on("close", () => this.close());
    pipe.on("end", () => this.close());
  }

  get closed(): boolean {
    return this.#closed;
  }

  send(frame: Buffer): void {
    if (this.#closed) return;
    if (!this.#corked) {
      this.#corked = true;
      this.#pipe.cork();
      process.nextTick(() => {
        this.#corked = false;
        this.#pipe.uncork();
      });
    }
    this.#pipe.write(frame);
  }

  close(error?: Error): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#pipe.destroy();
    const onClose = this.#onClose;
    this.#onClose = undefined;
    onClose?.(error);
  }
}
