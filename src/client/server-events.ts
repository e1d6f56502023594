/**
 * Reads a Server-Sent Events body as the server writes it (events and watch
 * routes): `: connected` once the stream is set up, then `event:`/`data:`
 * blocks. Resolves never: it rejects when the body ends or breaks, or when a
 * handler throws (the server's last `error` event does).
 */
import { AgentVmError } from "../errors.ts";

export async function readServerEvents(body: NonNullable<Response["body"]>, url: string, handlers: { connected(): void; event(name: string, data: string): void }): Promise<never> {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new AgentVmError("ECONNRESET", `the server ended the event connection ${url}`);
    buffer += value;
    let end: number;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (block.startsWith(": connected")) handlers.connected();
      let event = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) handlers.event(event, data);
    }
  }
}
