/**
 * handle.exec() with onStdout / onStderr: the streamed form of the exec action
 * (Accept: application/x-ndjson, see src/server/exec-stream.ts), delivering
 * output as the program prints it and resolving with the same ExecResult.
 */
import { AgentVmError, invalidArgument } from "../errors.ts";
import { EXEC_STREAM_TYPE, fromBase64 } from "../wire.ts";
import type { ExecOptions, ExecResult } from "../vm.ts";

export function wantsStream(options: unknown): options is ExecOptions {
  return typeof options === "object" && options !== null && ("onStdout" in options || "onStderr" in options);
}

/** Sends the exec request (callbacks left out) and reads the answer line by line. */
export async function execStreamed(
  post: (args: unknown[], accept: string) => Promise<Response>,
  command: string,
  args: string[] | undefined,
  options: ExecOptions,
): Promise<ExecResult> {
  const { onStdout, onStderr, ...rest } = options;
  for (const [name, callback] of [["onStdout", onStdout], ["onStderr", onStderr]] as const) {
    if (callback !== undefined && typeof callback !== "function") throw invalidArgument(`exec: options.${name} must be a function, got ${typeof callback}`);
  }
  const response = await post([command, args ?? [], rest], EXEC_STREAM_TYPE);
  const output = { stdout: [] as Uint8Array[], stderr: [] as Uint8Array[] };
  const text = (parts: Uint8Array[]) => {
    const joined = new Uint8Array(parts.reduce((size, part) => size + part.byteLength, 0));
    let offset = 0;
    for (const part of parts) joined.set(part, (offset += part.byteLength) - part.byteLength);
    return new TextDecoder().decode(joined);
  };
  const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  // However this ends (a result, an error, a callback that throws), the stream is let go; a
  // server whose reader left kills the program.
  try {
    return await readLines();
  } finally {
    void reader.cancel().catch(() => {});
  }
  async function readLines(): Promise<ExecResult> {
  for (;;) {
    let chunk: Awaited<ReturnType<typeof reader.read>>;
    try {
      chunk = await reader.read();
    } catch (error) {
      throw new AgentVmError("ECONNRESET", `exec ${command}: the stream broke off (${(error as Error).message})`, { cause: error });
    }
    if (chunk.done) throw new AgentVmError("ECONNRESET", `exec ${command}: the stream ended before the program's result`);
    buffer += chunk.value;
    let end: number;
    while ((end = buffer.indexOf("\n")) !== -1) {
      const line = JSON.parse(buffer.slice(0, end)) as { type: string; stream?: "stdout" | "stderr"; data?: string; value?: { pid: number; exitCode: number }; error?: unknown };
      buffer = buffer.slice(end + 1);
      if (line.type === "output" && (line.stream === "stdout" || line.stream === "stderr")) {
        const data = fromBase64(line.data ?? "");
        output[line.stream].push(data);
        (line.stream === "stdout" ? onStdout : onStderr)?.(data);
      } else if (line.type === "result") {
        return { pid: line.value!.pid, exitCode: line.value!.exitCode, stdout: text(output.stdout), stderr: text(output.stderr) };
      } else if (line.type === "error") {
        const error = AgentVmError.from(line.error);
        // The server leaves out of details what the output lines carried.
        if (error.details) Object.assign(error.details, { stdout: text(output.stdout), stderr: text(output.stderr) });
        throw error;
      }
    }
  }
  }
}
