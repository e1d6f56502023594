/**
 * The framed protocol between a guest process and its VM's kernel, spoken over
 * one pipe per guest (fd 3 in the guest). Both sides import this file, so it must
 * stay free of host-only imports: the guest directory is mounted into the sandbox
 * on its own.
 *
 * Frame: u32 length of what follows | u8 type | u32 id | payload.
 * - CALL   guest → kernel, id = request id, payload = JSON { op, ... }
 * - REPLY  kernel → guest, id = request id, payload = JSON result or { error }
 * - EVENT  kernel → guest, id = 0, payload = JSON { type, ... }
 * - DATA / END / CLOSE / CREDIT: byte streams (TCP connections, child stdio),
 *   id = stream id. Stream ids are allocated by the kernel only, so the two
 *   sides never collide.
 * - DGRAM  kernel → guest, id = UDP socket id, payload = u16 header length | JSON | bytes.
 *   (Sends are CALLs, so each send learns its own outcome.)
 *
 * Flow control is credit based, end to end: a writer may have at most
 * STREAM_WINDOW bytes sent and not yet credited back by the final reader. The
 * kernel relays DATA and CREDIT between the two ends and enforces the window,
 * so nobody in the middle buffers more than one window per stream direction.
 */

export const FrameType = {
  CALL: 1,
  REPLY: 2,
  EVENT: 3,
  DATA: 4,
  END: 5,
  CLOSE: 6,
  CREDIT: 7,
  DGRAM: 8,
} as const;
export type FrameType = (typeof FrameType)[keyof typeof FrameType];

/** Bytes a stream writer may have in flight before it must wait for credit. */
export const STREAM_WINDOW = 256 * 1024;
/** A reader returns credit once it has consumed this much, to batch CREDIT frames. */
export const CREDIT_BATCH = STREAM_WINDOW / 4;
/** Largest frame either side accepts (a CALL carries spawn args and env); bigger is a protocol violation. */
export const MAX_FRAME = 4 * 1024 * 1024;
/** Largest DATA payload a writer emits at once. */
export const MAX_DATA_CHUNK = 64 * 1024;

const HEADER = 9;

export interface Frame {
  type: FrameType;
  id: number;
  payload: Buffer;
}

export function encodeFrame(type: FrameType, id: number, payload?: Uint8Array): Buffer {
  const length = payload ? payload.byteLength : 0;
  const frame = Buffer.allocUnsafe(HEADER + length);
  frame.writeUInt32LE(length + 5, 0);
  frame.writeUInt8(type, 4);
  frame.writeUInt32LE(id, 5);
  if (payload) frame.set(payload, HEADER);
  return frame;
}

/** Header only, for callers that write the payload buffer separately (writev). */
export function encodeHeader(type: FrameType, id: number, payloadLength: number): Buffer {
  const header = Buffer.allocUnsafe(HEADER);
  header.writeUInt32LE(payloadLength + 5, 0);
  header.writeUInt8(type, 4);
  header.writeUInt32LE(id, 5);
  return header;
}

export function encodeJson(type: FrameType, id: number, value: unknown): Buffer {
  return encodeFrame(type, id, Buffer.from(JSON.stringify(value), "utf8"));
}

export function encodeCredit(id: number, bytes: number): Buffer {
  const payload = Buffer.allocUnsafe(4);
  payload.writeUInt32LE(bytes, 0);
  return encodeFrame(FrameType.CREDIT, id, payload);
}

export function encodeDgram(id: number, header: unknown, data: Uint8Array): Buffer {
  const json = Buffer.from(JSON.stringify(header), "utf8");
  const payload = Buffer.allocUnsafe(2 + json.byteLength + data.byteLength);
  payload.writeUInt16LE(json.byteLength, 0);
  payload.set(json, 2);
  payload.set(data, 2 + json.byteLength);
  return encodeFrame(FrameType.DGRAM, id, payload);
}

export function decodeDgram(payload: Buffer): { header: unknown; data: Buffer } {
  const length = payload.readUInt16LE(0);
  return {
    header: JSON.parse(payload.subarray(2, 2 + length).toString("utf8")),
    data: payload.subarray(2 + length),
  };
}

export function parseJson(payload: Buffer): unknown {
  return JSON.parse(payload.toString("utf8"));
}

/**
 * Incremental frame decoder. Keeps a list of received chunks and only copies
 * when a frame spans chunks, so a large transfer costs linear time (a single
 * growing Buffer.concat went quadratic on multi-megabyte bodies).
 */
export class FrameDecoder {
  #chunks: Buffer[] = [];
  #buffered = 0;

  /** Adds received bytes and returns the frames they completed; throws on a malformed length. */
  push(chunk: Buffer): Frame[] {
    this.#chunks.push(chunk);
    this.#buffered += chunk.byteLength;
    const frames: Frame[] = [];
    while (this.#buffered >= 4) {
      const length = this.#peekLength();
      if (length < 5 || length > MAX_FRAME) {
        throw new Error(`protocol violation: frame length ${length}`);
      }
      if (this.#buffered < length + 4) break;
      const bytes = this.#take(length + 4);
      frames.push({
        type: bytes.readUInt8(4) as FrameType,
        id: bytes.readUInt32LE(5),
        payload: bytes.subarray(HEADER),
      });
    }
    return frames;
  }

  #peekLength(): number {
    const first = this.#chunks[0]!;
    if (first.byteLength >= 4) return first.readUInt32LE(0);
    return this.#take(4, true).readUInt32LE(0);
  }

  /** Removes (or with peek, copies) the first n buffered bytes. */
  #take(n: number, peek = false): Buffer {
    const first = this.#chunks[0]!;
    if (first.byteLength >= n) {
      if (peek) return first;
      if (first.byteLength === n) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(n);
      this.#buffered -= n;
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let copied = 0;
    let index = 0;
    while (copied < n) {
      const chunk = this.#chunks[index]!;
      const part = Math.min(chunk.byteLength, n - copied);
      chunk.copy(out, copied, 0, part);
      copied += part;
      if (peek) {
        index++;
        continue;
      }
      if (part === chunk.byteLength) this.#chunks.shift();
      else this.#chunks[0] = chunk.subarray(part);
    }
    if (!peek) this.#buffered -= n;
    return out;
  }
}
