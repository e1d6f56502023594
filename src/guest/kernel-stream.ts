/**
 * Plain Readable/Writable views of a kernel stream, for streams that are not
 * sockets (a child process's stdio). They exist before the kernel has assigned
 * the stream — Node hands out `child.stdout` synchronously — and are attached
 * to it once the kernel answers; writes made in between wait.
 */
import { Readable, Writable } from "node:stream";
import { CreditBatcher, WindowedWriter } from "./flow.ts";
import { systemError, type KernelClient } from "./kernel-client.ts";

export interface PendingStream<S> {
  stream: S;
  attach(id: number): void;
  /** The stream will never be attached (the spawn failed). */
  abandon(): void;
}

export function kernelReadable(kernel: KernelClient): PendingStream<Readable> {
  let credit: CreditBatcher | undefined;
  let id: number | undefined;
  let held = 0;
  const readable = new Readable({
    read() {
      if (held > 0 && credit) {
        credit.consumed(held);
        held = 0;
      }
    },
    destroy(error, callback) {
      credit?.flush();
      if (id !== undefined) kernel.sendClose(id);
      callback(error);
    },
  });
  return {
    stream: readable,
    attach(streamId) {
      id = streamId;
      credit = new CreditBatcher((bytes) => kernel.sendCredit(streamId, bytes));
      kernel.openStream(streamId, {
        data(chunk) {
          if (readable.push(chunk)) credit!.consumed(chunk.byteLength);
          else held += chunk.byteLength;
        },
        end() {
          readable.push(null);
        },
        close() {
          readable.push(null);
        },
        credit() {},
      });
    },
    abandon() {
      readable.push(null);
    },
  };
}

export function kernelWritable(kernel: KernelClient): PendingStream<Writable> {
  let writer: WindowedWriter | undefined;
  let id: number | undefined;
  let closed = false;
  const waiting: (() => void)[] = [];
  const epipe = () => systemError({ code: "EPIPE", message: "the child process closed its stdin" }, "write");
  const writable = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      if (closed) callback(epipe());
      else if (writer) writer.write(chunk, callback);
      else waiting.push(() => (writer ? writer.write(chunk, callback) : callback(epipe())));
    },
    final(callback) {
      const finish = () => {
        if (!closed && id !== undefined) kernel.sendEnd(id);
        callback();
      };
      if (writer || closed) finish();
      else waiting.push(finish);
    },
    destroy(error, callback) {
      if (!closed && id !== undefined) kernel.sendClose(id);
      closed = true;
      writer?.abort(error ?? epipe());
      callback(error);
    },
  });
  writable.on("error", () => {});
  return {
    stream: writable,
    attach(streamId) {
      id = streamId;
      writer = new WindowedWriter((chunk) => kernel.sendData(streamId, chunk));
      kernel.openStream(streamId, {
        data() {},
        end() {},
        close() {
          closed = true;
          writer!.abort(epipe());
        },
        credit(bytes) {
          writer!.credit(bytes);
        },
      });
      for (const run of waiting.splice(0)) run();
    },
    abandon() {
      closed = true;
      for (const run of waiting.splice(0)) run();
    },
  };
}
