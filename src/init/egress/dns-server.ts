/**
 * The VM's DNS stub resolver (DESIGN §1 "Egress goes through policy"): what
 * `/etc/resolv.conf` names inside a VM, on UDP and TCP of one port.
 *
 * A and AAAA questions are answered by `resolve` — the server's policy and
 * resolver — with a short TTL so a name is decided again soon after a policy
 * change. `localhost` and `*.localhost` are the VM's own and answered here.
 * Other types get an empty NOERROR answer: the name may exist, it has nothing
 * of that type for the VM (HTTPS/SVCB, MX, TXT … are not served).
 *
 * A denial answers REFUSED, not NXDOMAIN: NXDOMAIN says "this name does not
 * exist", which resolvers cache negatively and programs report as a typo;
 * REFUSED says "this server will not answer", is never cached, and the name
 * works as soon as a rule allows it.
 *
 * Bounds: at most `maxConcurrent` questions are being resolved at once (more
 * get SERVFAIL at once), each for at most `timeoutMs`; a TCP connection is
 * served one query at a time and holds at most one frame (≤ 64 KiB).
 */
import dgram from "node:dgram";
import net from "node:net";
import type DnsPacket from "dns-packet";
import { errorCode, type ResolveName } from "./types.ts";

export interface DnsServerOptions {
  /** TTL of every answer, in seconds. Default 5. */
  ttlSeconds?: number;
  /** Questions resolved at once across UDP and TCP. Default 64. */
  maxConcurrent?: number;
  /** How long one `resolve` may take before the answer is SERVFAIL. Default 5000 ms. */
  timeoutMs?: number;
  /** How long a TCP connection may sit idle. Default 10000 ms. */
  tcpIdleMs?: number;
}

export interface DnsServer {
  /** Binds UDP and TCP to the same port (0 picks one free on both) and resolves to it. */
  listen(port: number, host: string): Promise<number>;
  close(): Promise<void>;
}

type Codec = typeof DnsPacket;
let codec: Promise<Codec> | undefined;
/** dns-packet is loaded with the first question: ~8 ms of every VM's start-up, for VMs that never resolve a name. */
function loadCodec(): Promise<Codec> {
  codec ??= import("dns-packet").then((module) => module.default);
  return codec;
}

const RCODE = { NOERROR: 0, FORMERR: 1, SERVFAIL: 2, NXDOMAIN: 3, NOTIMP: 4, REFUSED: 5 } as const;
const OPCODE_QUERY = 0;
const UDP_MAX = 512;
const MAX_ANSWERS = 16;

export function createDnsServer(resolve: ResolveName, options: DnsServerOptions = {}): DnsServer {
  const answer = createAnswerer(resolve, options);
  const tcp = net.createServer((socket) => serveTcp(socket, answer, options.tcpIdleMs ?? 10_000));
  tcp.maxConnections = 64;
  let udp: dgram.Socket | undefined;

  const serveUdp = (host: string, port: number): Promise<dgram.Socket> =>
    new Promise((bound, failed) => {
      const socket = dgram.createSocket({ type: net.isIPv6(host) ? "udp6" : "udp4" });
      socket.once("error", failed);
      socket.bind(port, host, () => {
        socket.off("error", failed);
        // A send to a client that went away is that client's loss, not the server's.
        socket.on("error", () => {});
        bound(socket);
      });
      socket.on("message", (message, remote) => {
        void answer(message, UDP_MAX).then(
          (reply) => reply && socket.send(reply, remote.port, remote.address),
          () => {},
        );
      });
    });

  return {
    async listen(port, host) {
      for (let attempt = 0; ; attempt++) {
        await new Promise<void>((listening, failed) => {
          tcp.once("error", failed);
          tcp.listen(port, host, () => {
            tcp.off("error", failed);
            listening();
          });
        });
        const chosen = (tcp.address() as net.AddressInfo).port;
        try {
          udp = await serveUdp(host, chosen);
          return chosen;
        } catch (error) {
          await new Promise<void>((closed) => tcp.close(() => closed()));
          // With port 0 the port TCP got may be taken on UDP; pick again a few times.
          if (port !== 0 || attempt >= 4 || (error as NodeJS.ErrnoException).code !== "EADDRINUSE") throw error;
        }
      }
    },
    async close() {
      await Promise.all([new Promise<void>((closed) => (udp ? udp.close(() => closed()) : closed())), new Promise<void>((closed) => tcp.close(() => closed()))]);
    },
  };
}

/** Never trusted to be total: a query dns-packet decodes but cannot re-encode makes it reject, and the query goes unanswered. */
type Answerer = (query: Buffer, maxBytes: number) => Promise<Buffer | undefined>;

function createAnswerer(resolve: ResolveName, options: DnsServerOptions): Answerer {
  const ttl = options.ttlSeconds ?? 5;
  const maxConcurrent = options.maxConcurrent ?? 64;
  const timeoutMs = options.timeoutMs ?? 5_000;
  let inFlight = 0;

  return async (query, maxBytes) => {
    const dnsPacket = await loadCodec();
    const encode = (packet: DnsPacket.DecodedPacket, rcode: number, answers: DnsPacket.Answer[], bytes: number) => encodeReply(dnsPacket, packet, rcode, answers, bytes);
    let packet: DnsPacket.DecodedPacket;
    try {
      packet = dnsPacket.decode(query);
    } catch {
      // Too broken to answer; a header alone is enough to say so.
      return query.length >= 12 && (query[2]! & 0x80) === 0 ? header(query, RCODE.FORMERR) : undefined;
    }
    if (packet.type !== "query") return undefined;
    const opcode = (query[2]! >> 3) & 0x0f;
    const questions = packet.questions ?? [];
    if (opcode !== OPCODE_QUERY) return encode(packet, RCODE.NOTIMP, [], maxBytes);
    if (questions.length !== 1) return encode(packet, RCODE.FORMERR, [], maxBytes);
    const question = questions[0]!;
    const family = question.type === "A" ? 4 : question.type === "AAAA" ? 6 : undefined;
    if (family === undefined || question.class !== "IN") return encode(packet, RCODE.NOERROR, [], maxBytes);
    const name = question.name.toLowerCase().replace(/\.$/, "");

    let addresses: string[];
    if (name === "localhost" || name.endsWith(".localhost")) {
      addresses = [family === 4 ? "127.0.0.1" : "::1"];
    } else {
      if (inFlight >= maxConcurrent) return encode(packet, RCODE.SERVFAIL, [], maxBytes);
      inFlight++;
      try {
        addresses = await withTimeout(resolve(name, family), timeoutMs);
      } catch (error) {
        return encode(packet, rcodeFor(errorCode(error)), [], maxBytes);
      } finally {
        inFlight--;
      }
    }
    const answers = addresses.slice(0, MAX_ANSWERS).map((address) => ({ type: question.type, class: "IN", name: question.name, ttl, data: address }) as DnsPacket.Answer);
    return encode(packet, RCODE.NOERROR, answers, maxBytes);
  };
}

function rcodeFor(code: string): number {
  switch (code) {
    case "EACCES":
      return RCODE.REFUSED;
    case "ENOTFOUND":
    case "INVALID_ARGUMENT":
      return RCODE.NXDOMAIN;
    default:
      return RCODE.SERVFAIL;
  }
}

/** The reply to `query`: its id, question and RD bit, with RA set; truncated (TC, no answers) past `maxBytes`. */
function encodeReply(dnsPacket: Codec, query: DnsPacket.DecodedPacket, rcode: number, answers: DnsPacket.Answer[], maxBytes: number): Buffer {
  const flags = (query.flag_rd ? dnsPacket.RECURSION_DESIRED : 0) | dnsPacket.RECURSION_AVAILABLE | rcode;
  const reply = dnsPacket.encode({ type: "response", id: query.id ?? 0, flags, questions: query.questions ?? [], answers });
  if (reply.length <= maxBytes) return reply;
  return dnsPacket.encode({ type: "response", id: query.id ?? 0, flags: flags | dnsPacket.TRUNCATED_RESPONSE, questions: query.questions ?? [], answers: [] });
}

/** A bare header answering an undecodable query: same id, QR set, no sections. */
function header(query: Buffer, rcode: number): Buffer {
  const reply = Buffer.alloc(12);
  query.copy(reply, 0, 0, 2);
  reply[2] = 0x80 | (query[2]! & 0x79); // QR, opcode and RD kept
  reply[3] = 0x80 | rcode; // RA
  return reply;
}

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(Object.assign(new Error(`dns resolve took over ${ms} ms`), { code: "ETIMEDOUT" })), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** RFC 7766 framing (2-byte length), one query at a time: the socket is paused while one is answered. */
function serveTcp(socket: net.Socket, answer: Answerer, idleMs: number): void {
  let buffered: Buffer = Buffer.alloc(0);
  let busy = false;
  socket.setTimeout(idleMs, () => socket.destroy());
  socket.on("error", () => socket.destroy());

  const next = async () => {
    while (!busy && buffered.length >= 2) {
      const length = buffered.readUInt16BE(0);
      if (length < 12) return void socket.destroy();
      if (buffered.length < 2 + length) return;
      const query = buffered.subarray(2, 2 + length);
      buffered = buffered.subarray(2 + length);
      busy = true;
      socket.pause();
      const reply = await answer(query, 0xffff).catch(() => undefined);
      if (socket.destroyed) return;
      if (reply) {
        const frame = Buffer.alloc(2 + reply.length);
        frame.writeUInt16BE(reply.length, 0);
        reply.copy(frame, 2);
        if (!socket.write(frame)) await new Promise((drained) => socket.once("drain", drained));
      }
      busy = false;
      socket.resume();
    }
  };
  socket.on("data", (chunk: Buffer) => {
    buffered = buffered.length === 0 ? chunk : Buffer.concat([buffered, chunk]);
    // A frame is at most 2 + 65535 bytes; one chunk past it while a query is answered is the most that can wait.
    if (buffered.length > 2 + 0xffff + 65_536) return void socket.destroy();
    void next();
  });
}
