/**
 * A cluster node's gateway passing a preview to its owning node, without an
 * engine: the engine being unreachable (a real refused connection) is a typed
 * 503, not the 403 an unknown token gets, and an https owner is reached over TLS
 * (for HTTP and for upgrades), with SNI naming the owner's advertised host.
 */
import assert from "node:assert/strict";
import { once } from "node:events";
import http from "node:http";
import https from "node:https";
import { connect, createServer as createNetServer, type AddressInfo } from "node:net";
import tls from "node:tls";
import { after, before, describe, it } from "node:test";
import { forwardPreview, forwardPreviewUpgrade, NodeDirectory } from "../src/cluster/preview-forwarding.ts";
import { makeCertificates } from "./policy-support.ts";

/** A gateway that forwards every request to node "b" through `directory`, answering 403 when b is unknown (as the real gateway does). */
async function gateway(directory: NodeDirectory): Promise<{ port: number; close(): Promise<void> }> {
  const server = http.createServer(async (request, response) => {
    if (!(await forwardPreview(directory, "b", request, response))) response.writeHead(403).end("unknown node");
  });
  server.on("upgrade", async (request, socket, head) => {
    if (!(await forwardPreviewUpgrade(directory, "b", request, socket, head))) socket.end("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return { port: (server.address() as AddressInfo).port, close: () => new Promise((resolve) => (server.closeAllConnections(), server.close(() => resolve()))) };
}

/** Sends an upgrade request and returns the first chunk the gateway answers with. */
async function upgradeAnswer(port: number, send = ""): Promise<string> {
  const socket = connect(port, "127.0.0.1");
  socket.write(`GET /preview/t/socket HTTP/1.1\r\nhost: 127.0.0.1:${port}\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n${send}`);
  let text = "";
  for await (const chunk of socket) {
    text += String(chunk);
    if (text.includes("\r\n\r\n") && (send === "" || text.includes(send))) break;
  }
  socket.destroy();
  return text;
}

describe("an engine that cannot be read", () => {
  let closedPort = 0;
  let front: Awaited<ReturnType<typeof gateway>>;
  before(async () => {
    // A port nothing listens on: the engine is down.
    const probe = createNetServer().listen(0, "127.0.0.1");
    await once(probe, "listening");
    closedPort = (probe.address() as AddressInfo).port;
    await new Promise((resolve) => probe.close(resolve));
    front = await gateway(new NodeDirectory(`http://127.0.0.1:${closedPort}`, undefined));
  });
  after(() => front.close());

  it("answers 503 PREVIEW_NODE_UNAVAILABLE (retry), not 403", async () => {
    const response = await fetch(`http://127.0.0.1:${front.port}/preview/t/`, { signal: AbortSignal.timeout(10_000) });
    assert.equal(response.status, 503);
    assert.equal(response.headers.get("x-agentvm-error"), "1");
    const body = (await response.json()) as { error: { code: string; message: string } };
    assert.equal(body.error.code, "PREVIEW_NODE_UNAVAILABLE");
    assert.match(body.error.message, /node b/);
  });

  it("answers an upgrade the same way", async () => {
    const answer = await upgradeAnswer(front.port);
    assert.match(answer, /^HTTP\/1\.1 503 /);
    assert.match(answer, /PREVIEW_NODE_UNAVAILABLE/);
  });
});

describe("an owner whose advertised preview origin is https", () => {
  const certs = makeCertificates("localhost");
  const handshakes: (string | false)[] = [];
  let owner: https.Server;
  let front: Awaited<ReturnType<typeof gateway>>;
  const defaults = tls.getCACertificates("default");
  before(async () => {
    // This process trusts the test CA, as a node trusts its balancer's certificate.
    tls.setDefaultCACertificates([...defaults, certs.caCert]);
    owner = https.createServer({ key: certs.serverKey, cert: certs.serverCert }, (request, response) => response.end(`owner ${request.url} for ${request.headers.host}`));
    owner.on("secureConnection", (socket: tls.TLSSocket) => handshakes.push((socket as unknown as { servername: string | false }).servername));
    owner.on("upgrade", (_request, socket) => {
      socket.write("HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n");
      socket.pipe(socket);
    });
    owner.listen(0, "127.0.0.1");
    await once(owner, "listening");
    const previewUrl = `https://localhost:${(owner.address() as AddressInfo).port}`;
    front = await gateway({ lookup: async (node: string) => (node === "b" ? { url: "https://api.example", previewUrl } : undefined) } as unknown as NodeDirectory);
  });
  after(async () => {
    tls.setDefaultCACertificates(defaults);
    await front.close();
    owner.closeAllConnections();
    await new Promise((resolve) => owner.close(resolve));
  });

  it("forwards HTTP over TLS, SNI naming the owner, the browser's Host kept", async () => {
    const response = await fetch(`http://127.0.0.1:${front.port}/preview/t/page`, { signal: AbortSignal.timeout(10_000) });
    assert.equal(await response.text(), `owner /preview/t/page for 127.0.0.1:${front.port}`);
    assert.equal(response.status, 200);
    assert.deepEqual(handshakes.at(-1), "localhost");
  });

  it("forwards an upgrade over TLS, bytes both ways", async () => {
    const answer = await upgradeAnswer(front.port, "ping through TLS");
    assert.match(answer, /^HTTP\/1\.1 101 /);
    assert.ok(answer.includes("ping through TLS"), answer);
  });
});
