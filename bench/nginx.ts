/**
 * nginx as a reverse proxy in front of the baseline server: the yardstick the
 * preview gateway is held to (DESIGN §5: "≥ nginx as a proxy in the same
 * run"). Used only when /usr/sbin/nginx exists; the bench never installs it.
 *
 * One worker process (the gateway is one Node thread), upstream keep-alive,
 * no buffering, no access log: nginx at its quickest for this job.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { freePort, sleep } from "./stats.ts";

export const NGINX = "/usr/sbin/nginx";

export function nginxAvailable(): boolean {
  return existsSync(NGINX);
}

export interface NginxProxy {
  port: number;
  stop(): Promise<void>;
}

/** Starts nginx proxying 127.0.0.1:<its port> → 127.0.0.1:`upstreamPort`; resolves once it accepts connections. */
export async function startNginxProxy(upstreamPort: number): Promise<NginxProxy> {
  const prefix = await mkdtemp(join(tmpdir(), "agentvm-bench-nginx-"));
  const port = await freePort();
  const conf = join(prefix, "nginx.conf");
  await writeFile(
    conf,
    `worker_processes 1;
daemon off;
master_process on;
pid ${prefix}/nginx.pid;
error_log ${prefix}/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path ${prefix}/body;
  proxy_temp_path ${prefix}/proxy;
  fastcgi_temp_path ${prefix}/fastcgi;
  uwsgi_temp_path ${prefix}/uwsgi;
  scgi_temp_path ${prefix}/scgi;
  upstream baseline { server 127.0.0.1:${upstreamPort}; keepalive 64; }
  server {
    listen 127.0.0.1:${port};
    location / {
      proxy_pass http://baseline;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
`,
  );
  const child = spawn(NGINX, ["-p", prefix, "-c", conf], { stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  child.stderr!.setEncoding("utf8");
  child.stderr!.on("data", (text: string) => (log += text));
  const stop = async () => {
    await stopChild(child);
    await rm(prefix, { recursive: true, force: true });
  };
  try {
    await waitForPort(port, child, () => log);
  } catch (error) {
    await stop();
    throw error;
  }
  return { port, stop };
}


async function waitForPort(port: number, child: ChildProcess, log: () => string): Promise<void> {
  const deadline = Date.now() + 5000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`nginx exited (code ${child.exitCode}): ${log().trim()}`);
    const open = await new Promise<boolean>((resolve) => {
      const socket = connect(port, "127.0.0.1");
      socket.once("connect", () => (socket.destroy(), resolve(true)));
      socket.once("error", () => resolve(false));
    });
    if (open) return;
    await sleep(20);
  }
  throw new Error(`nginx did not listen on 127.0.0.1:${port} within 5 s: ${log().trim()}`);
}

function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill("SIGKILL"), 3000);
    child.once("exit", () => (clearTimeout(timer), resolve()));
    // SIGQUIT: graceful stop of master and workers.
    child.kill("SIGQUIT");
  });
}
