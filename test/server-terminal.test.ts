/**
 * Interactive terminals over the server's WebSocket route, streamed exec and
 * the spawn handle, through the typed client (and the `ws` library where the
 * wire itself is the subject), against a real server with real guests.
 */
import assert from "node:assert/strict";
import { mkdtemp, realpath, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import WebSocket from "ws";
import { agentOS, generateApiKey, setup, type RunningServer } from "agentvm";
import { createClient, type ClientTerminal } from "agentvm/client";
import { rejection, waitFor } from "./helpers.ts";

const registry = setup({ use: { vm: agentOS({ limits: { maxProcesses: 4 } }) } });
const apiKey = generateApiKey();
let dataDir: string;
let server: RunningServer;
let client: ReturnType<typeof createClient<typeof registry>>;

before(async () => {
  dataDir = await realpath(await mkdtemp(join(tmpdir(), "agentvm-terminal-")));
  server = await registry.start({ port: 0, dataDir, handleSignals: false, auth: { apiKeys: [apiKey] } });
  client = createClient<typeof registry>({ endpoint: server.url, token: apiKey });
});

after(async () => {
  await server?.close();
  if (dataDir) await rm(dataDir, { recursive: true, force: true });
});

/** Everything a terminal printed so far, as text, and a wait for a pattern in it. */
function screen(terminal: ClientTerminal) {
  let text = "";
  const decoder = new TextDecoder();
  terminal.onData((data) => (text += decoder.decode(data, { stream: true })));
  return {
    get text() {
      return text;
    },
    /** Waits until the output after `from` matches; returns where the match ends. */
    async until(pattern: RegExp, from = 0): Promise<number> {
      const found = await waitFor(() => {
        const match = pattern.exec(text.slice(from));
        return match ? from + match.index + match[0].length : null;
      }, `${pattern} in the terminal (so far: ${JSON.stringify(text.slice(from).slice(-300))})`);
      return found;
    },
  };
}

const PROMPT = /[#$] $/m;

describe("terminals over the WebSocket route", () => {
  it("types into bash and reads back: prompt, echo, TERM, resize, Ctrl-C, exit code", async () => {
    const handle = client.vm.getOrCreate("term-basic");
    const terminal = await handle.openTerminal({ cols: 100, rows: 30 });
    assert.ok(terminal.pid > 0);
    assert.deepEqual([terminal.cols, terminal.rows], [100, 30]);
    const out = screen(terminal);
    let at = await out.until(PROMPT);
    terminal.write("echo hello-$((6*7)) $TERM\r");
    at = await out.until(/hello-42 xterm-256color/, at);
    terminal.write("stty size\r");
    at = await out.until(/30 100/, at);
    terminal.resize(120, 40);
    terminal.write("stty size\r");
    at = await out.until(/40 120/, at);
    // A foreground sleep interrupted by Ctrl-C, as the line discipline does it: $? is 128 + SIGINT.
    terminal.write("sleep 60; echo not-interrupted\r");
    at = await out.until(/sleep 60[^\n]*\n/, at);
    await waitFor(async () => (await handle.listProcesses()).some((process) => process.command.endsWith("sleep")), "sleep to run");
    terminal.write(new Uint8Array([3]));
    terminal.write("echo status-$?\r");
    at = await out.until(/status-130/, at);
    // Only the typed command line shows the word: the echo after sleep never ran.
    assert.equal(out.text.split("not-interrupted").length, 2, out.text);
    const listed = (await handle.listProcesses()).find((process) => process.pid === terminal.pid);
    assert.equal(listed?.terminal, true);
    assert.equal(listed?.running, true);
    terminal.write("exit 3\r");
    assert.deepEqual(await terminal.exited, { exitCode: 3, signal: null });
    assert.equal(await handle.waitProcess(terminal.pid), 3);
  });

  it("runs full-screen programs: vi edits, saves and quits; top draws and quits", async () => {
    const terminal = await client.vm.getOrCreate("term-vi").openTerminal({ command: "vi", args: ["/tmp/notes.txt"], cols: 80, rows: 24 });
    const out = screen(terminal);
    // The alternate screen or a cursor move is what a full-screen program sends first.
    await out.until(/\x1b\[/);
    terminal.write("ihello from vi");
    let at = await out.until(/hello from vi/);
    // Escape alone, as a key: vi waits a moment after ESC to tell it from an escape sequence.
    terminal.write("\x1b");
    at = await out.until(/\[Modified\]/, at);
    terminal.write(":wq\r");
    assert.deepEqual(await terminal.exited, { exitCode: 0, signal: null });
    assert.equal(new TextDecoder().decode(await client.vm.getOrCreate("term-vi").readFile("/tmp/notes.txt")), "hello from vi\n");
    // top finds its terminfo entry for xterm-256color, clears the screen, draws, and quits on q.
    const top = await client.vm.getOrCreate("term-vi").openTerminal({ command: "top" });
    await screen(top).until(/\x1b\[H\x1b\[2J[\s\S]*load average/);
    top.write("q");
    assert.deepEqual(await top.exited, { exitCode: 0, signal: null });
  });

  it("several terminals per VM; closing one hangs its program up; each counts toward maxProcesses", async () => {
    const handle = client.vm.getOrCreate("term-many");
    const first = await handle.openTerminal();
    const second = await handle.openTerminal({ command: "sh" });
    assert.notEqual(first.pid, second.pid);
    const out = screen(second);
    await out.until(PROMPT);
    await first.close();
    // Hung up (SIGHUP) and gone when close() resolves; the second is untouched.
    assert.deepEqual(await first.exited, { exitCode: 128 + 1, signal: "SIGHUP" });
    assert.equal((await handle.listProcesses()).find((process) => process.pid === first.pid)?.running, false);
    second.write("echo still-here\r");
    await out.until(/still-here/);
    const fillers = [await handle.spawn("sleep", ["60"]), await handle.spawn("sleep", ["60"]), await handle.spawn("sleep", ["60"])];
    const refused = await rejection(handle.openTerminal());
    assert.equal(refused.code, "EAGAIN", refused.message);
    for (const filler of fillers) await filler.kill("SIGKILL");
    second.kill("SIGKILL");
    assert.deepEqual(await second.exited, { exitCode: 128 + 9, signal: "SIGKILL" });
  });

  it("refuses bad options with typed errors and leaves nothing running", async () => {
    const handle = client.vm.getOrCreate("term-bad");
    for (const options of [{ cols: 0 }, { rows: 1001 }, { cols: 1.5 }]) {
      const error = await rejection(handle.openTerminal(options as { cols: number }));
      assert.equal(error.code, "INVALID_ARGUMENT", error.message);
      assert.match(error.message, /1 to 1000/);
    }
    const missing = await rejection(handle.openTerminal({ command: "no-such-program" }));
    assert.equal(missing.code, "ENOENT", missing.message);
    const unknown = await rejection(handle.openTerminal({ shell: "bash" } as never));
    assert.equal(unknown.code, "INVALID_ARGUMENT");
    const terminal = await handle.openTerminal();
    assert.throws(() => terminal.resize(0, 10), { code: "INVALID_ARGUMENT" });
    await terminal.close();
    // close() resolves once the hang-up ended the program, so nothing is left running.
    assert.deepEqual(await terminal.exited, { exitCode: 128 + 1, signal: "SIGHUP" });
    assert.equal((await handle.listProcesses()).filter((process) => process.running).length, 0);
  });

  it("input a program does not read is held back, not piled up: the VM and its init stay well", async () => {
    const handle = client.vm.getOrCreate("term-input");
    const terminal = await handle.openTerminal({ command: "sleep", args: ["600"] });
    // 16 MiB typed at a program that never reads: the pty takes a few KiB, the rest waits in the client.
    const chunk = new Uint8Array(64 * 1024).fill(0x61);
    for (let sent = 0; sent < 16 * 1024 * 1024; sent += chunk.byteLength) terminal.write(chunk);
    // Another program in the same VM is served meanwhile: init is neither stuck nor out of memory.
    assert.equal((await handle.exec("echo", ["alive"])).stdout, "alive\n");
    terminal.kill("SIGKILL");
    assert.deepEqual(await terminal.exited, { exitCode: 137, signal: "SIGKILL" });
    assert.equal((await handle.exec("echo", ["still alive"])).stdout, "still alive\n");
  });

  it("a token must allow openTerminal; a foreign Origin never gets a WebSocket", async () => {
    const narrow = server.createToken({ key: "term-auth", actions: ["exec"] });
    const denied = await rejection(createClient<typeof registry>({ endpoint: server.url, token: narrow.token }).vm.getOrCreate("term-auth").openTerminal());
    assert.equal(denied.code, "FORBIDDEN", denied.message);
    const unauthenticated = await rejection(createClient<typeof registry>({ endpoint: server.url, token: "" }).vm.getOrCreate("term-auth").openTerminal());
    assert.equal(unauthenticated.code, "UNAUTHENTICATED", unauthenticated.message);
    const allowed = server.createToken({ key: "term-auth", actions: ["openTerminal"] });
    const terminal = await createClient<typeof registry>({ endpoint: server.url, token: allowed.token }).vm.getOrCreate("term-auth").openTerminal({ command: "sh", args: ["-c", "exit 5"] });
    assert.deepEqual(await terminal.exited, { exitCode: 5, signal: null });

    const url = `${server.url.replace("http", "ws")}/api/vm/term-auth/terminal`;
    const attempt = (headers: Record<string, string>) =>
      new Promise<{ status: number; body: string } | "open">((resolve, reject) => {
        const socket = new WebSocket(url, ["agentvm.terminal.v1"], { headers: { authorization: `Bearer ${apiKey}`, ...headers } });
        socket.on("open", () => {
          socket.close();
          resolve("open");
        });
        socket.on("unexpected-response", (_request, response) => {
          let body = "";
          response.on("data", (chunk: Buffer) => (body += chunk));
          response.on("end", () => resolve({ status: response.statusCode ?? 0, body }));
        });
        socket.on("error", reject);
      });
    const foreign = await attempt({ origin: "https://evil.example" });
    assert.notEqual(foreign, "open");
    assert.equal((foreign as { status: number }).status, 403);
    assert.equal(JSON.parse((foreign as { body: string }).body).error.code, "ORIGIN_NOT_ALLOWED");
    assert.equal(await attempt({ origin: server.url }), "open");
    // A plain GET of the route says what it is.
    const plain = await fetch(url.replace("ws", "http"), { headers: { authorization: `Bearer ${apiKey}` } });
    assert.equal(plain.status, 426);
    assert.equal(((await plain.json()) as { error: { code: string } }).error.code, "UPGRADE_REQUIRED");
  });

  it("a reader that stops reading is cut off with EVENTS_TOO_SLOW and its program hung up; the server stays bounded", async () => {
    const handle = client.vm.getOrCreate("term-slow");
    const socket = new WebSocket(`${server.url.replace("http", "ws")}/api/vm/term-slow/terminal?command=sh&arg=-c&arg=${encodeURIComponent("while :; do cat /usr/share/common-licenses/* /etc/services 2>/dev/null || seq 1 100000; done")}`, ["agentvm.terminal.v1"], {
      headers: { authorization: `Bearer ${apiKey}` },
    });
    const messages: string[] = [];
    socket.on("message", (data, isBinary) => {
      if (!isBinary) messages.push(String(data));
    });
    const closed = new Promise<number>((resolve) => socket.on("close", (code) => resolve(code)));
    await new Promise((resolve) => socket.once("open", resolve));
    await waitFor(() => messages.some((message) => message.includes('"ready"')), "the terminal to be ready");
    const pid = JSON.parse(messages.find((message) => message.includes('"ready"'))!).pid as number;
    // Stop reading: the server's buffer for this socket fills, then it gives up on it.
    socket.pause();
    await waitFor(async () => !(await handle.listProcesses()).find((process) => process.pid === pid)?.running, "the flooding terminal to be hung up", 60_000);
    socket.resume();
    assert.equal(await closed, 4000);
    const error = messages.map((message) => JSON.parse(message) as { type: string; error?: { code: string } }).find((message) => message.type === "error");
    assert.equal(error?.error?.code, "EVENTS_TOO_SLOW");
  });
});

describe("streamed exec and the spawn handle", () => {
  it("exec's onStdout and onStderr get chunks while the program still runs", async () => {
    const handle = client.vm.getOrCreate("exec-stream");
    const chunks: { stream: string; text: string }[] = [];
    // The program waits for a file the test writes only after the first chunk arrived: output comes before the end.
    const script = "echo first; echo oops >&2; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second";
    const running = handle.exec("sh", ["-c", script], {
      onStdout: (data) => chunks.push({ stream: "stdout", text: new TextDecoder().decode(data) }),
      onStderr: (data) => chunks.push({ stream: "stderr", text: new TextDecoder().decode(data) }),
    });
    await waitFor(() => chunks.some((chunk) => chunk.text.includes("first")) && chunks.some((chunk) => chunk.stream === "stderr"), "the first chunks");
    assert.ok(!chunks.some((chunk) => chunk.text.includes("second")));
    await handle.writeFile("/tmp/go", "");
    const result = await running;
    assert.equal(result.exitCode, 0);
    assert.equal(result.stdout, "first\nsecond\n");
    assert.equal(result.stderr, "oops\n");
    assert.ok(chunks.some((chunk) => chunk.text.includes("second")));

    const limited = await rejection(handle.exec("sh", ["-c", "echo 0123456789; sleep 30"], { maxOutputBytes: 4, onStdout: () => {} }));
    assert.equal(limited.code, "EXEC_OUTPUT_LIMIT");
    assert.equal((limited as unknown as { details: { stdout: string } }).details.stdout, "0123");
    const missing = await rejection(handle.exec("no-such-program", [], { onStdout: () => {} }));
    assert.equal(missing.code, "ENOENT");
  });

  it("spawn resolves to { pid } with wait, kill, stdin and logs", async () => {
    const handle = client.vm.getOrCreate("spawn-handle");
    const cat = await handle.spawn("cat");
    assert.deepEqual({ ...cat }, { pid: cat.pid });
    assert.deepEqual(JSON.parse(JSON.stringify(cat)), { pid: cat.pid });
    await cat.stdin.write("line one\n");
    await waitFor(async () => (await cat.logs()).output.some((chunk) => new TextDecoder().decode(chunk.data).includes("line one")), "cat to echo its input");
    await cat.stdin.end();
    assert.equal(await cat.wait(), 0);
    const logs = await cat.logs({ tail: 4 });
    assert.equal(logs.pid, cat.pid);
    const sleeper = await handle.spawn("sleep", ["60"]);
    await sleeper.kill();
    assert.equal(await sleeper.wait(), 128 + 15);
    const stopped = await handle.spawn("sleep", ["60"]);
    await stopped.kill("SIGKILL");
    assert.equal(await stopped.wait(), 128 + 9);
  });
});
