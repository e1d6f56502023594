/**
 * An agentvm server in its own process, so a test can read the server's memory
 * from /proc without its own heap counting. argv: <dataDir> [agentOS config as
 * JSON] [start options as JSON]. Prints the URL on one line once it listens;
 * closes the server and exits when stdin ends.
 */
import { agentOS, setup, type AgentOsConfig } from "agentvm";

const dataDir = process.argv[2];
if (!dataDir) throw new Error("usage: server-child.ts <dataDir> [agentOS config JSON] [start options JSON]");
const config = JSON.parse(process.argv[3] ?? "{}") as AgentOsConfig;
const options = JSON.parse(process.argv[4] ?? "{}") as Record<string, unknown>;

const registry = setup({ use: { vm: agentOS(config) } });
const server = await registry.start({ ...options, port: 0, dataDir, handleSignals: false });
process.stdout.write(`${server.url}\n`);

process.stdin.resume();
process.stdin.once("end", () => {
  server.close().then(
    () => process.exit(0),
    (error: unknown) => {
      console.error("test server: close failed", error);
      process.exit(1);
    },
  );
});
