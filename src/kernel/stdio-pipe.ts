/**
 * Joins a real OS pipe of a guest process (its stdin, stdout or stderr on the
 * host) to a kernel stream, so another guest can hold the other end — which is
 * how a guest's `child_process.spawn` gets its child's stdio. Flow control holds
 * across the join: a full window pauses the OS pipe, and a slow child's stdin
 * holds back credit.
 */
import type { Readable, Writable } from "node:stream";
import { WindowedWriter } from "../guest/flow.ts";
import type { StreamEnd, StreamOwner } from "./stream.ts";

/** Feeds an OS readable (a child's stdout) into a kernel stream end. */
export function readableOwner(readable: Readable): { owner: StreamOwner; attach(end: StreamEnd): void } {
  let writer: WindowedWriter | undefined;
  let inFlight = 0;
  const owner: StreamOwner = {
    data() {},
    end() {},
    close() {
      readable.removeAllListeners("data");
      readable.resume();
    },
    credit(bytes) {
      writer?.credit(bytes);
    },
  };
  return {
    owner,
    attach(end) {
      writer = new WindowedWriter((chunk) => end.write(chunk));
      readable.on("data", (chunk: Buffer) => {
        inFlight++;
        if (inFlight > 1) readable.pause();
        writer!.write(chunk, () => {
          inFlight--;
          if (inFlight <= 1) readable.resume();
        });
      });
      readable.once("end", () => end.end());
    },
  };
}

/** Delivers a kernel stream (a parent writing to its child) into an OS writable. */
export function writableOwner(writable: Writable, credit: (bytes: number) => void): StreamOwner {
  writable.on("error", () => {});
  return {
    data(chunk) {
      writable.write(chunk, () => credit(chunk.byteLength));
    },
    end() {
      writable.end();
    },
    close() {
      writable.end();
    },
    credit() {},
  };
}
