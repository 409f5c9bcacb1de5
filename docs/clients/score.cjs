// Score images with an exported model from JavaScript (onnxruntime-node), no Python:
//   node docs/clients/score.cjs MODEL_DIR INPUT.bin N
// INPUT.bin holds N preprocessed images, float32 (N, C, H, W), as metadata.json's "preprocessing"
// says (resize to "size", colour mode, pixel * scale + offset). Prints {"score": [...], "anomaly": [...]}.
const { readFileSync } = require("node:fs");
const { join } = require("node:path");
const ort = require("onnxruntime-node");

async function main() {
  const [modelDir, inputPath, n] = process.argv.slice(2);
  const version = join(modelDir, JSON.parse(readFileSync(join(modelDir, "MODEL.json"), "utf8")).current);
  const meta = JSON.parse(readFileSync(join(version, "metadata.json"), "utf8"));
  const [, c, h, w] = meta.input.shape;
  const bytes = readFileSync(inputPath);
  const images = new ort.Tensor("float32", new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4),
                                [Number(n), c, h, w]);
  const session = await ort.InferenceSession.create(join(version, "scorer.onnx"), { logSeverityLevel: 3 });
  const out = await session.run({ image: images });  // or { image: images, threshold: new ort.Tensor("float32", [2.5], []) }
  console.log(JSON.stringify({ score: Array.from(out.score.data), anomaly: Array.from(out.anomaly.data) }));
}
main().catch((e) => { console.error(`error: ${e.message}`); process.exit(2); });
