// The smallest stdio MCP server, for tests that start a thousand children: node alone starts
// in ~40 ms where a server on the TypeScript SDK takes ~300 ms. Tools: `ping` (answers with
// its pid), `hang` (never answers; a cancellation is written to stderr), `change` (sends
// notifications/tools/list_changed first).
import { createInterface } from "node:readline";

const lines = createInterface({ input: process.stdin });
const send = (message) => process.stdout.write(JSON.stringify(message) + "\n");
lines.on("line", (line) => {
  const message = JSON.parse(line);
  if (message.method === "notifications/cancelled") {
    console.error(`tiny: cancelled request ${message.params.requestId}`);
    return;
  }
  if (message.id === undefined) return;
  const answer = (result) => send({ jsonrpc: "2.0", id: message.id, result });
  switch (message.method) {
    case "initialize":
      return answer({ protocolVersion: message.params.protocolVersion, capabilities: { tools: { listChanged: true } },
                      serverInfo: { name: "tiny", version: "1" } });
    case "tools/list":
      return answer({ tools: [{ name: "ping", inputSchema: { type: "object" } }] });
    case "tools/call":
      if (message.params.name === "hang") return;
      if (message.params.name === "change") send({ jsonrpc: "2.0", method: "notifications/tools/list_changed" });
      return answer({ content: [{ type: "text", text: `pong ${process.pid}` }] });
    default:
      return send({ jsonrpc: "2.0", id: message.id, error: { code: -32601, message: "Method not found" } });
  }
});
lines.on("close", () => process.exit(0));
