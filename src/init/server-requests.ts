/**
 * init's own requests to the server: an outbound connection (answered with
 * the connected socket as a handle) or a name, which the server's network
 * policy decides. Each request has an id and gets exactly one answer.
 */
import type { Socket } from "node:net";
import type { FromInit, ToInit } from "./protocol.ts";

type Answer = Extract<ToInit, { t: "egress" } | { t: "resolved" }>;

const failure = (answer: { code: string; message: string }) => Object.assign(new Error(answer.message), { code: answer.code });

export class ServerRequests {
  readonly #send: (message: FromInit) => void;
  readonly #waiting = new Map<number, (answer: { message: Answer; handle: Socket | undefined }) => void>();
  #nextId = 1;

  constructor(send: (message: FromInit) => void) {
    this.#send = send;
  }

  async openEgress(target: { host: string; port: number; via: string; pid?: number }): Promise<Socket> {
    const { message, handle } = await this.#ask({ t: "egress", host: target.host, port: target.port, via: target.via, ...(target.pid ? { pid: target.pid } : {}) });
    if (message.t !== "egress" || !message.ok || !handle) throw failure(message.t === "egress" && !message.ok ? message : { code: "EIO", message: "no connection" });
    return handle;
  }

  async resolveName(name: string, family: 4 | 6, pid?: number): Promise<string[]> {
    const { message } = await this.#ask({ t: "resolve", name, family, ...(pid ? { pid } : {}) });
    if (message.t !== "resolved" || !message.ok) throw failure(message.t === "resolved" && !message.ok ? message : { code: "EIO", message: "no answer" });
    return message.addresses;
  }

  /** The server's answer to one of these requests. */
  answered(message: Answer, handle: Socket | undefined): void {
    const waiter = this.#waiting.get(message.id);
    this.#waiting.delete(message.id);
    if (waiter) waiter({ message, handle });
    else handle?.destroy();
  }

  #ask(request: Record<string, unknown>): Promise<{ message: Answer; handle: Socket | undefined }> {
    const id = this.#nextId++;
    const { promise, resolve } = Promise.withResolvers<{ message: Answer; handle: Socket | undefined }>();
    this.#waiting.set(id, resolve);
    this.#send({ ...request, id } as FromInit);
    return promise;
  }
}
