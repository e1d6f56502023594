/**
 * The baseline: the same "ok" HTTP server as the guest, but in a plain Node
 * child process (the pinned Node, no sandbox, no preload) on a real 127.0.0.1
 * port, and a client built the way vmFetch builds its own: Node's
 * http.request over a keep-alive http.Agent with the same settings, reading
 * the whole body. The ratio vmFetch/baseline then isolates what agentvm adds.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { Agent, request } from "node:http";
import { fileURLToPath } from "node:url";
import type { FetchOnce } from "./load.ts";

/** The pinned Node 26 (system node may be older). */
export const PINNED_NODE = fileURLToPath(new URL("../node_modules/.bin/node", import.meta.url));

/** Same handler as the guest server; prints the port it got so we need not guess a free one. */
const SERVER_SOURCE = `
const http = require("node:http");
const server = http.createServer((q, s) => s.end("ok")).listen(0, "127.0.0.1", () => console.log(server.address().port));
`;

export interface BaselineServer {
  port: number;
  pid: number;
  stop(): Promise<void>;
}

export async function startBaselineServer(): Promise<BaselineServer> {
  return startNodeServer(SERVER_SOURCE);
}

/**
 * Any baseline server: `source` is CommonJS run by the pinned Node in a child
 * process; it must listen on 127.0.0.1 and print its port as its first line.
 */
export async function startNodeServer(source: string): Promise<BaselineServer> {
  const child = spawn(PINNED_NODE, ["--input-type=commonjs", "-e", source], { stdio: ["ignore", "pipe", "inherit"] });
  const port = await readPort(child);
  return {
    port,
    pid: child.pid!,
    stop: () => stopChild(child),
  };
}

function readPort(child: ChildProcess): Promise<number> {
  return new Promise((resolve, reject) => {
    let text = "";
    child.stdout!.setEncoding("utf8");
    child.stdout!.on("data", (chunk: string) => {
      text += chunk;
      const match = /^(\d+)\n/.exec(text);
      if (match) resolve(Number(match[1]));
    });
    child.once("error", reject);
    child.once("exit", (code) => reject(new Error(`baseline server exited early (code ${code})`)));
  });
}

function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    child.once("exit", () => resolve());
    child.kill("SIGKILL");
  });
}

/** Mirrors the Agent options in src/net/vm-fetch.ts so both sides pool connections alike. */
export function newKeepAliveAgent(): Agent {
  return new Agent({ keepAlive: true, keepAliveMsecs: 1000, maxFreeSockets: 64 });
}

/** GET `path` on 127.0.0.1:`port`, reading the body to the end like vmFetch does. */
export function directFetcher(agent: Agent, port: number, path = "/"): FetchOnce {
  const headers = { host: `localhost:${port}` };
  return () =>
    new Promise<void>((resolve, reject) => {
      const req = request({ agent, host: "127.0.0.1", port, path, method: "GET", headers });
      req.once("error", reject);
      req.once("response", async (response) => {
        try {
          const chunks: Buffer[] = [];
          for await (const chunk of response) chunks.push(chunk as Buffer);
          const body = Buffer.concat(chunks);
          if (response.statusCode !== 200 || body.length !== 2) throw new Error(`baseline answered ${response.statusCode} with ${body.length} bytes`);
          resolve();
        } catch (error) {
          reject(error);
        }
      });
      req.end();
    });
}
