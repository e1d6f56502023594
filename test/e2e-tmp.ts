import { createVm } from "agentvm";
const vm = await createVm({ dataDir: "/tmp/e2e-data", name: "four", listen: { portMin: 5000, portMax: 5002 } });
await vm.writeFile("/tmp/t.js", `
const net = require("net");
(async () => { for (let i = 0; i < 4; i++) console.log(await new Promise(r => { const s = net.createServer(); s.once("error", e => r(e.code + " " + e.message)); s.listen(0, "127.0.0.1", () => r(s.address().port)); })); })();
`);
const r = await vm.exec("sh", ["-c", "cat /proc/sys/net/ipv4/ip_local_port_range; node /tmp/t.js"]);
console.log(r.stdout, r.stderr);
await vm.dispose();
