/**
 * Joins a real host TCP socket (allowed egress) to a kernel stream end, so a
 * guest's connection to the outside flows with the same credit windows as one
 * inside the VM: a full window pauses the real socket, and the guest's writes
 * are credited back once the host socket has taken them.
 */
import type { Socket } from "node:net";
import { WindowedWriter } from "../guest/flow.ts";
import type { StreamEnd, StreamOwner } from "./stream.ts";

export function realSocketOwner(socket: Socket): { owner: StreamOwner; start(end: StreamEnd): void } {
  let writer: WindowedWriter | undefined;
  let end: StreamEnd | undefined;
  socket.on("error", () => {}); // 'close' follows and carries the outcome
  const owner: StreamOwner = {
    data(chunk) {
      socket.write(chunk, () => end?.credit(chunk.byteLength));
    },
    end() {
      socket.end();
    },
    close(reset) {
      if (reset) socket.resetAndDestroy();
      else socket.destroy();
    },
    credit(bytes) {
      writer?.credit(bytes);
    },
  };
  return {
    owner,
    start(kernelEnd) {
      end = kernelEnd;
      writer = new WindowedWriter((chunk) => kernelEnd.write(chunk));
      let queued = 0;
      socket.on("data", (chunk: Buffer) => {
        if (++queued > 1) socket.pause();
        writer!.write(chunk, () => {
          if (--queued <= 1) socket.resume();
        });
      });
      socket.once("end", () => kernelEnd.end());
      socket.once("close", (hadError) => {
        if (hadError) kernelEnd.reset();
        else kernelEnd.close();
      });
    },
  };
}
