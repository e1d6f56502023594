/**
 * The agentvm server the server-side benchmarks talk to, run as its own
 * process (see server-process.ts) so its memory can be read from /proc and the
 * benchmark client's own heap never counts.
 *
 * argv: <dataDir> [agentOS config as JSON] [start options as JSON]. Prints the server URL on one line
 * once it listens; closes the server (ending every VM's processes) and exits when its
 * stdin ends.
 */
import { agentOS, setup, type AgentOsConfig } from "agentvm";

const dataDir = process.argv[2];
if (!dataDir) throw new Error("usage: server-child.ts <dataDir> [agentOS config JSON]");
const config = JSON.parse(process.argv[3] ?? "{}") as AgentOsConfig;
const startOptions = JSON.parse(process.argv[4] ?? "{}") as Record<string, unknown>;

const registry = setup({ use: { vm: agentOS(config) } });
const server = await registry.start({ ...startOptions, port: 0, dataDir, handleSignals: false });
process.stdout.write(`${server.url}\n`);

process.stdin.resume();
process.stdin.once("end", () => {
  server.close().then(
    () => process.exit(0),
    (error: unknown) => {
      console.error("bench server: close failed", error);
      process.exit(1);
    },
  );
});
