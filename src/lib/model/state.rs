//! The recurrent state: per layer the previous token's ln1 and ln2 outputs (token shift) and the
//! WKV matrix `[H,N,N]` in f32 (as all official code keeps it). This is everything that carries
//! over between tokens, so a conversation can live in a state file.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::fsutil::write_atomic;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub const STATE_FORMAT_VERSION: &str = "1";

#[derive(Clone, Debug)]
pub struct LayerState {
    /// `[B,C]`: ln1 output of the last token.
    pub att_shift: Tensor,
    /// `[B,H,N,N]`: S indexed [head, value i, key j].
    pub wkv: Tensor,
    /// `[B,C]`: ln2 output of the last token.
    pub ffn_shift: Tensor,
}

#[derive(Clone, Debug)]
pub struct State {
    pub layers: Vec<LayerState>,
}

impl State {
    pub fn zeros(cfg: &ModelConfig, batch: usize, dev: &Device) -> Result<State> {
        let (c, h, n) = (cfg.d_model, cfg.n_head(), cfg.head_size);
        let layers = (0..cfg.n_layer)
            .map(|_| {
                Ok(LayerState {
                    att_shift: Tensor::zeros((batch, c), DType::F32, dev)?,
                    wkv: Tensor::zeros((batch, h, n, n), DType::F32, dev)?,
                    ffn_shift: Tensor::zeros((batch, c), DType::F32, dev)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(State { layers })
    }

    pub fn batch(&self) -> usize {
        self.layers
            .first()
            .map(|l| l.att_shift.dims()[0])
            .unwrap_or(0)
    }

    /// A batch-1 state repeated for `b` rows. Differentiable: a row's gradient flows back to the
    /// one state (summed over the rows).
    pub fn repeat(&self, b: usize) -> Result<State> {
        let rep = |t: &Tensor| -> Result<Tensor> {
            let mut dims = t.dims().to_vec();
            dims[0] = b;
            Ok(t.broadcast_as(dims)?.contiguous()?)
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerState {
                    att_shift: rep(&l.att_shift)?,
                    wkv: rep(&l.wkv)?,
                    ffn_shift: rep(&l.ffn_shift)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(State { layers })
    }

    /// The same values cut from the autograd graph (truncated backpropagation between chunks).
    pub fn detach(&self) -> State {
        State {
            layers: self
                .layers
                .iter()
                .map(|l| LayerState {
                    att_shift: l.att_shift.detach(),
                    wkv: l.wkv.detach(),
                    ffn_shift: l.ffn_shift.detach(),
                })
                .collect(),
        }
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            out.push((format!("state.{i}.att_shift"), l.att_shift.clone()));
            out.push((format!("state.{i}.wkv"), l.wkv.clone()));
            out.push((format!("state.{i}.ffn_shift"), l.ffn_shift.clone()));
        }
        out
    }

    /// Saves the state with the model's identity, atomically.
    pub fn save(&self, path: &Path, cfg: &ModelConfig) -> Result<()> {
        let meta: HashMap<String, String> = [
            ("tinybit.format".to_string(), "state".to_string()),
            (
                "tinybit.version".to_string(),
                STATE_FORMAT_VERSION.to_string(),
            ),
            ("tinybit.model".to_string(), cfg.arch_hash()),
        ]
        .into();
        let tensors = self.tensors();
        let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.clone(), t)), Some(meta))
            .map_err(|e| Error::Io(format!("serialising state {}: {e}", path.display())))?;
        write_atomic(path, &bytes)
    }

    /// Loads a state saved for the same model architecture; another model's state is refused.
    pub fn load(path: &Path, cfg: &ModelConfig, dev: &Device) -> Result<State> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, "reading state file", e))?;
        let p = path.display();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            Error::Data(format!(
                "state file {p} is corrupt or not a safetensors file: {e}"
            ))
        })?;
        let md = meta.metadata().clone().unwrap_or_default();
        if md.get("tinybit.format").map(String::as_str) != Some("state") {
            return Err(Error::Data(format!("{p} is not a tinybit state file")));
        }
        match md.get("tinybit.version").map(String::as_str) {
            Some(STATE_FORMAT_VERSION) => {}
            Some(v) => {
                return Err(Error::Data(format!(
                    "state file {p} has format version {v}; this tinybit reads version \
                     {STATE_FORMAT_VERSION}: save the state again with this tinybit"
                )));
            }
            None => {
                return Err(Error::Data(format!(
                    "state file {p} has no format version (tinybit.version); this tinybit reads \
                     version {STATE_FORMAT_VERSION}: save the state again with this tinybit"
                )));
            }
        }
        let want = cfg.arch_hash();
        match md.get("tinybit.model") {
            Some(id) if *id == want => {}
            Some(id) => {
                return Err(Error::Data(format!(
                    "state file {p} belongs to a different model (model id {id}, this model is \
                     {want}); use a state saved with this model"
                )));
            }
            None => {
                return Err(Error::Data(format!(
                    "state file {p} does not say which model it belongs to (no tinybit.model; this \
                     model is {want}); use a state saved with this model"
                )));
            }
        }
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::Data(format!("state file {p} is corrupt: {e}")))?;
        let zero = State::zeros(cfg, 1, dev)?;
        let batch = st
            .tensor("state.0.att_shift")
            .map(|t| t.shape()[0])
            .unwrap_or(1);
        let mut out = State::zeros(cfg, batch, dev)?;
        for (i, l) in out.layers.iter_mut().enumerate() {
            let proto = &zero.layers[i];
            for (field, slot, one) in [
                ("att_shift", &mut l.att_shift, &proto.att_shift),
                ("wkv", &mut l.wkv, &proto.wkv),
                ("ffn_shift", &mut l.ffn_shift, &proto.ffn_shift),
            ] {
                let name = format!("state.{i}.{field}");
                let view = st
                    .tensor(&name)
                    .map_err(|e| Error::Data(format!("state file {p}: tensor {name}: {e}")))?;
                let mut want_shape = one.dims().to_vec();
                want_shape[0] = batch;
                if view.shape() != want_shape.as_slice() || view.dtype() != safetensors::Dtype::F32
                {
                    return Err(Error::Data(format!(
                        "state file {p}: tensor {name} has shape {:?} {:?}, expected {want_shape:?} F32",
                        view.shape(),
                        view.dtype()
                    )));
                }
                let vals: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                // A NaN or infinity would silently poison every logit after it.
                if let Some(at) = vals.iter().position(|v| !v.is_finite()) {
                    return Err(Error::Data(format!(
                        "state file {p}: tensor {name} holds a non-finite value ({}) at element {at}; \
                         the file is corrupt: save the state again or start without --state-in",
                        vals[at]
                    )));
                }
                *slot = Tensor::from_vec(vals, want_shape, dev)?;
            }
        }
        Ok(out)
    }
}
