/**
 * `npm start`: a demo VM on the embedded defaults (a local data directory),
 * running a real Node HTTP server inside the sandbox and calling it with vmFetch.
 */
import { createVm } from "./index.ts";

const dataDir = process.env.AGENTVM_DATA_DIR ?? ".agentvm";
const vm = await createVm({ dataDir, name: "demo" });
vm.on("processOutput", ({ pid, stream, data }) => process.stdout.write(`[vm pid ${pid} ${stream}] ${Buffer.from(data).toString()}`));

await vm.writeFile(
  "/home/agentos/server.js",
  `require("http").createServer((req, res) => res.end("Hello from inside the VM: " + req.method + " " + req.url + "\\n")).listen(3000, () => console.log("listening on 3000"));`,
);
const { pid } = await vm.spawn("node", ["/home/agentos/server.js"]);
for (let attempt = 0; ; attempt++) {
  try {
    const response = await vm.vmFetch(3000, "/");
    console.log(`vmFetch(3000, "/") → ${response.status}: ${new TextDecoder().decode(response.body).trim()}`);
    break;
  } catch (error) {
    if ((error as { code?: string }).code !== "ECONNREFUSED" || attempt > 500) throw error;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
console.log(`The VM's files are in ${vm.root}. Press Ctrl-C to stop.`);
const stop = async () => {
  await vm.killProcess(pid).catch(() => {});
  await vm.dispose();
  process.exit(0);
};
process.once("SIGINT", stop);
process.once("SIGTERM", stop);
