// The smallest stdio MCP server, for tests that start a thousand children: node alone starts
// in ~40 ms where a server on the TypeScript SDK takes ~300 ms. Tools: `ping` (answers with
// its pid), `hang` (never answers; a cancellation is written to stderr), `change` (sends
// notifications/tools/list_changed first, and lists `routed` from then on: its `region`
// argument is mirrored into an Mcp-Param-Region header). Each tools/list is written to stderr.
import { createInterface } from "node:readline";

const lines = createInterface({ input: process.stdin });
const tools = [{ name: "ping", inputSchema: { type: "object" } }];
const routed = { name: "routed", inputSchema: { type: "object", properties: { region: { type: "string", "x-mcp-header": "Region" } } } };
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
      console.error("tiny: tools/list");
      return answer({ tools });
    case "tools/call":
      if (message.params.name === "hang") return;
      if (message.params.name === "change") {
        if (!tools.includes(routed)) tools.push(routed);
        send({ jsonrpc: "2.0", method: "notifications/tools/list_changed" });
      }
      return answer({ content: [{ type: "text", text: `pong ${process.pid}` }] });
    default:
      return send({ jsonrpc: "2.0", id: message.id, error: { code: -32601, message: "Method not found" } });
  }
});
lines.on("close", () => process.exit(0));
