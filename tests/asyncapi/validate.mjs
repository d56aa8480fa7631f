// Validates one AsyncAPI document with the official parser (@asyncapi/parser: the AsyncAPI JSON
// Schemas plus the spec's semantic rules, e.g. that every $ref resolves and every operation's
// messages belong to its channel). Reads the document (JSON or YAML) from the file named by the
// first argument, or stdin; prints {"valid", "diagnostics": [{code, severity, message, path}]}
// as JSON on stdout; exits 0 when valid, 1 when not, 2 when it could not run.
import { readFileSync } from "node:fs";
import { Parser, DiagnosticSeverity } from "@asyncapi/parser";

const SEVERITY = ["error", "warning", "information", "hint"];

async function main() {
  const text = readFileSync(process.argv[2] ?? 0, "utf8");
  const { document, diagnostics } = await new Parser().parse(text);
  const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
  const valid = document !== undefined && errors.length === 0;
  const report = diagnostics.map((d) => ({
    code: String(d.code),
    severity: SEVERITY[d.severity] ?? String(d.severity),
    message: d.message,
    path: d.path.join("/"),
  }));
  process.stdout.write(JSON.stringify({ valid, diagnostics: report }) + "\n");
  process.exitCode = valid ? 0 : 1;
}

main().catch((error) => {
  process.stderr.write(`validate.mjs: ${error?.stack ?? error}\n`);
  process.exitCode = 2;
});
