/**
 * `npm start`: the agentvm server on its embedded defaults (SQLite and VM files
 * under ./.agentvm), with a demo VM that runs a real Node HTTP server inside
 * its sandbox. Prints what to try next.
 */
import { createClient } from "./client/index.ts";
import { agentOS, setup } from "./index.ts";

const registry = setup({ use: { vm: agentOS() } });
const server = await registry.start();
// A token for the demo VM works whether or not API keys are set (AGENTVM_API_KEYS).
const client = createClient<typeof registry>({ endpoint: server.url, token: server.createToken({ key: "demo", expiresInSeconds: 600 }).token });
const demo = client.vm.getOrCreate("demo");

await demo.writeFile(
  "/home/agentos/server.js",
  `const http = require("http");
http.createServer((req, res) => {
  res.writeHead(200, { "content-type": "text/plain" });
  res.end("Hello from inside the VM: " + req.method + " " + req.url + "\\n");
}).listen(3000, () => console.log("demo server listening on 3000"));
`,
);
const running = (await demo.listProcesses()).some((process) => process.running && process.args.includes("/home/agentos/server.js"));
if (!running) await demo.spawn("node", ["/home/agentos/server.js"]);
let greeting = "";
for (let attempt = 0; attempt < 500 && !greeting; attempt++) {
  try {
    greeting = new TextDecoder().decode((await demo.vmFetch(3000, "/")).body).trim();
  } catch (error) {
    if ((error as { code?: string }).code !== "ECONNREFUSED") throw error;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

const api = `${server.url}/api/vm/demo`;
const auth = server.authRequired ? `\nAPI keys are set: add -H "authorization: Bearer <key>" to each curl below.\n` : "";
console.log(`agentvm server listening on ${server.url} (data in ${server.dataDir})

The demo VM answered vmFetch(3000, "/"): ${greeting}
${auth}
Open ${server.url}/ in a browser for the dashboard: VMs, processes and logs, preview links, a terminal.

Try next:
  curl ${api}/fetch/3000/hello                       # vmFetch into the demo VM
  curl -X POST ${api}/actions/readdir -H 'content-type: application/json' -d '["/home/agentos"]'
  curl -X POST ${api}/actions/exec -H 'content-type: application/json' -d '["sh", ["-c", "uname -a; node --version; git --version"]]'
  curl -N ${api}/events                              # process output as Server-Sent Events

From TypeScript: createClient<typeof registry>("${server.url}").vm.getOrCreate("demo")
The HTTP API is described in docs/http-api.md. Ctrl-C stops the server.`);
