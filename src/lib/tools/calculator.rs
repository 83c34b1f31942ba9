//! `calculator`: arithmetic through evalexpr 11.3.1 (the last MIT release; 12.0 on is AGPL), made
//! safe for hostile input and for the answers people expect.
//!
//! - Length and parenthesis depth are capped before parsing: evalexpr's parser recurses, and a
//!   stack overflow aborts the whole process (no unwinding to catch).
//! - Parsing and evaluation run on a worker thread with its own stack, so even a panic inside the
//!   crate becomes an error.
//! - Only arithmetic is let through: numbers, `+ - * / % ^`, parentheses, the functions and
//!   constants below. No assignment, strings or booleans, so there is no state between calls.
//! - Numbers are evaluated as f64, so `7/2` is 3.5 (evalexpr would truncate integer division), and
//!   `^` is made right-associative (`2^3^2` = 2^9 = 512, as in mathematics; evalexpr gives 64).
//! - Division by zero and overflow are errors, not `inf`.

use super::{Tool, ToolResult, parse_args};
use evalexpr::{
    ContextWithMutableFunctions, ContextWithMutableVariables, EvalexprError, EvalexprResult,
    Function, HashMapContext, Node, Operator, Value as Num, build_operator_tree,
};
use serde_json::{Value, json};

/// Longest expression accepted, in bytes.
pub const MAX_LEN: usize = 1000;
/// Deepest parenthesis nesting accepted.
pub const MAX_DEPTH: usize = 64;
/// The worker thread's stack; far more than `MAX_LEN` characters of input can use.
const STACK: usize = 16 << 20;

const CONSTANTS: &[(&str, f64)] = &[
    ("pi", std::f64::consts::PI),
    ("e", std::f64::consts::E),
    ("tau", std::f64::consts::TAU),
];

type F1 = fn(f64) -> f64;
const FUNCTIONS_1: &[(&str, F1)] = &[
    ("sqrt", f64::sqrt),
    ("cbrt", f64::cbrt),
    ("abs", f64::abs),
    ("exp", f64::exp),
    ("ln", f64::ln),
    ("log2", f64::log2),
    ("log10", f64::log10),
    ("sin", f64::sin),
    ("cos", f64::cos),
    ("tan", f64::tan),
    ("asin", f64::asin),
    ("acos", f64::acos),
    ("atan", f64::atan),
    ("sinh", f64::sinh),
    ("cosh", f64::cosh),
    ("tanh", f64::tanh),
    ("floor", f64::floor),
    ("ceil", f64::ceil),
    ("round", f64::round),
    ("trunc", f64::trunc),
];
type F2 = fn(f64, f64) -> f64;
const FUNCTIONS_2: &[(&str, F2)] = &[
    ("pow", f64::powf),
    ("atan2", f64::atan2),
    ("hypot", f64::hypot),
];
/// Functions of a variable number of arguments, handled in `context`.
const FUNCTIONS_N: &[&str] = &["log", "min", "max"];

pub struct Calculator;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    expr: String,
}

impl Tool for Calculator {
    fn name(&self) -> &str {
        "calculator"
    }

    fn description(&self) -> &str {
        "Evaluate arithmetic: + - * / % ^ (power), parentheses, sqrt, ln, log, exp, sin, cos, tan, abs, \
         floor, ceil, round, min, max and more; constants pi, e"
    }

    fn schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "expr": {"type": "string", "description": "the expression, e.g. 2^10 or sqrt(144) * pi", "maxLength": MAX_LEN}
            },
            "required": ["expr"],
            "additionalProperties": false
        })
    }

    fn call(&self, args: &Value) -> ToolResult {
        let args: Args = parse_args("calculator", args)?;
        evaluate(&args.expr).map(to_json)
    }

    /// Two expressions are the same call when they evaluate to the same value (`18*12` = `12*18`).
    fn same_args(&self, a: &Value, b: &Value) -> bool {
        super::same_keys(a, b, |k, x, y| {
            let value = |v: &Value| v.as_str().and_then(|e| evaluate(e).ok());
            match (k, value(x), value(y)) {
                ("expr", Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
                _ => false,
            }
        })
    }
}

/// Evaluates `expr`; every failure is an `Err` with a message (the process never crashes).
pub fn evaluate(expr: &str) -> Result<f64, String> {
    precheck(expr)?;
    let owned = expr.to_string();
    std::thread::Builder::new()
        .name("calculator".into())
        .stack_size(STACK)
        .spawn(move || evaluate_checked(&owned))
        .map_err(|e| format!("calculator: cannot start its worker thread: {e}"))?
        .join()
        .map_err(|_| {
            format!(
                "calculator: evaluating '{}' failed inside the expression library; simplify it",
                shown(expr)
            )
        })?
}

/// Refuses what could hurt the parser, before it sees the input.
fn precheck(expr: &str) -> Result<(), String> {
    if expr.trim().is_empty() {
        return Err("calculator: the expression is empty; pass one such as 2^10".into());
    }
    if expr.len() > MAX_LEN {
        return Err(format!(
            "calculator: the expression is {} bytes long; at most {MAX_LEN} are accepted",
            expr.len()
        ));
    }
    let forbidden = |c: char| !c.is_ascii() || (c.is_ascii_control() && !c.is_ascii_whitespace());
    if let Some((i, c)) = expr.char_indices().find(|&(_, c)| forbidden(c)) {
        return Err(format!(
            "calculator: character {c:?} at byte {i} is not allowed; use ASCII digits, operators, \
             parentheses and function names (pi, not π; * and /, not × and ÷)"
        ));
    }
    let mut depth = 0usize;
    for c in expr.chars() {
        match c {
            '(' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!(
                        "calculator: parentheses nest deeper than {MAX_DEPTH} levels"
                    ));
                }
            }
            ')' if depth == 0 => return Err("calculator: a ')' has no matching '('".into()),
            ')' => depth -= 1,
            _ => {}
        }
    }
    if depth > 0 {
        return Err("calculator: a '(' is never closed".into());
    }
    Ok(())
}

fn evaluate_checked(full: &str) -> Result<f64, String> {
    let expr = shown(full);
    let mut tree =
        build_operator_tree(full).map_err(|e| format!("calculator: cannot parse '{expr}': {e}"))?;
    check(&tree)?;
    to_float(&mut tree);
    right_assoc_power(&mut tree);
    let ctx = context();
    let value = tree.eval_with_context(&ctx).map_err(|e| match e {
        // The functions' own messages, without evalexpr's "Error: " in front.
        EvalexprError::CustomMessage(m) => format!("calculator: cannot evaluate '{expr}': {m}"),
        e => format!("calculator: cannot evaluate '{expr}': {e}"),
    })?;
    if has_zero_divisor(&tree, &ctx) {
        return Err(format!("calculator: division by zero in '{expr}'"));
    }
    match value {
        Num::Float(x) if x.is_finite() => Ok(x),
        Num::Float(x) if x.is_nan() => Err(format!(
            "calculator: '{expr}' has no real value (such as sqrt of a negative number), or overflowed on the way"
        )),
        Num::Float(_) => Err(format!(
            "calculator: overflow: '{expr}' is too large to represent (beyond ±1.8e308)"
        )),
        Num::Int(i) => Ok(i as f64),
        Num::Tuple(_) => Err(format!(
            "calculator: '{expr}' gives several values; give one expression"
        )),
        _ => Err(format!("calculator: '{expr}' does not give a number")),
    }
}

/// The expression as quoted in messages: long ones are cut.
fn shown(expr: &str) -> String {
    match expr.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &expr[..cut]),
        None => expr.to_string(),
    }
}

/// Lets through only arithmetic on numbers, known constants and known functions.
fn check(node: &Node) -> Result<(), String> {
    match node.operator() {
        Operator::RootNode
        | Operator::Add
        | Operator::Sub
        | Operator::Neg
        | Operator::Mul
        | Operator::Div
        | Operator::Mod
        | Operator::Exp
        | Operator::Tuple => {}
        Operator::Const {
            value: Num::Int(_) | Num::Float(_),
        } => {}
        Operator::Const { value } => {
            return Err(format!("calculator: only numbers are allowed, not {value}"));
        }
        Operator::VariableIdentifierRead { identifier } => {
            if !CONSTANTS.iter().any(|(n, _)| n == identifier) {
                return Err(format!(
                    "calculator: unknown name '{identifier}'; the constants are pi, e and tau"
                ));
            }
        }
        Operator::FunctionIdentifier { identifier } => {
            if !function_names().any(|n| n == identifier) {
                return Err(format!(
                    "calculator: unknown function '{identifier}'; known: {}",
                    function_names().collect::<Vec<_>>().join(", ")
                ));
            }
        }
        op => {
            return Err(format!(
                "calculator: '{}' is not arithmetic; use numbers, + - * / % ^, parentheses and functions",
                op.to_string().trim()
            ));
        }
    }
    node.children().iter().try_for_each(check)
}

fn function_names() -> impl Iterator<Item = &'static str> {
    FUNCTIONS_1
        .iter()
        .map(|f| f.0)
        .chain(FUNCTIONS_2.iter().map(|f| f.0))
        .chain(FUNCTIONS_N.iter().copied())
}

/// Integer literals become floats, so `/` divides instead of truncating and nothing wraps.
fn to_float(node: &mut Node) {
    if let Operator::Const { value } = node.operator_mut() {
        if let Num::Int(i) = *value {
            *value = Num::Float(i as f64);
        }
    }
    node.children_mut().iter_mut().for_each(to_float);
}

/// evalexpr parses `a^b^c` as `(a^b)^c`; rotate every such chain into `a^(b^c)`. A parenthesised
/// `(a^b)^c` is left alone: the parentheses put a `RootNode` between the two powers.
fn right_assoc_power(node: &mut Node) {
    node.children_mut().iter_mut().for_each(right_assoc_power);
    rotate_power(node);
}

/// `(a ^ b) ^ c` -> `a ^ (b ^ c)` at `node`, for a node whose children are already rotated.
fn rotate_power(node: &mut Node) {
    while is_power(node) && is_power(&node.children()[0]) {
        let mut kids = std::mem::take(node.children_mut());
        // Cannot fail: `is_power` checked both nodes are binary `^` with two children.
        let c = kids.pop().expect("a power has two operands");
        let mut inner = kids.pop().expect("a power has two operands");
        let mut inner_kids = std::mem::take(inner.children_mut());
        let b = inner_kids.pop().expect("a power has two operands");
        let a = inner_kids.pop().expect("a power has two operands");
        // The inner node is reused for b ^ c; b may itself be an unrotated-at-the-top power.
        *inner.children_mut() = vec![b, c];
        rotate_power(&mut inner);
        *node.children_mut() = vec![a, inner];
    }
}

fn is_power(node: &Node) -> bool {
    matches!(node.operator(), Operator::Exp) && node.children().len() == 2
}

/// Float division by zero gives inf or NaN, or vanishes (`1/(1/0)` = 0); check every divisor.
fn has_zero_divisor(node: &Node, ctx: &HashMapContext) -> bool {
    let divides =
        matches!(node.operator(), Operator::Div | Operator::Mod) && node.children().len() == 2;
    if divides && matches!(node.children()[1].eval_with_context(ctx), Ok(Num::Float(d)) if d == 0.0)
    {
        return true;
    }
    node.children().iter().any(|c| has_zero_divisor(c, ctx))
}

/// Constants and functions; evalexpr's own builtins are off (some panic on odd input, and the
/// string functions are no calculator's business).
fn context() -> HashMapContext {
    let mut ctx = HashMapContext::new();
    // Cannot fail: setting values and functions of a fresh HashMapContext never errors.
    let fail = "calculator: building its function table cannot fail";
    evalexpr::Context::set_builtin_functions_disabled(&mut ctx, true).expect(fail);
    for (name, x) in CONSTANTS {
        ctx.set_value(name.to_string(), Num::Float(*x)).expect(fail);
    }
    for &(name, f) in FUNCTIONS_1 {
        let func = move |arg: &Num| match numbers(name, arg)?.as_slice() {
            [x] => Ok(Num::Float(f(*x))),
            _ => arity(name, "1"),
        };
        ctx.set_function(name.into(), Function::new(func))
            .expect(fail);
    }
    for &(name, f) in FUNCTIONS_2 {
        let func = move |arg: &Num| match numbers(name, arg)?.as_slice() {
            [x, y] => Ok(Num::Float(f(*x, *y))),
            _ => arity(name, "2"),
        };
        ctx.set_function(name.into(), Function::new(func))
            .expect(fail);
    }
    let log = |arg: &Num| match numbers("log", arg)?.as_slice() {
        [x] => Ok(Num::Float(x.log10())),
        // log_b(x) = ln x / ln b, and ln 1 = 0: base 1 divides by zero (f64::log would give ±inf,
        // reported as an overflow, or NaN for x = 1).
        [_, base] if *base == 1.0 => Err(EvalexprError::CustomMessage(
            "division by zero: log base 1 (the change of base divides by ln 1 = 0)".into(),
        )),
        // f64::log gives -0 for base 0, a wrong answer rather than none.
        [_, base] if *base <= 0.0 => Err(EvalexprError::CustomMessage(format!(
            "log base {base} has no real logarithm; the base must be positive and not 1"
        ))),
        [x, base] => Ok(Num::Float(x.log(*base))),
        _ => arity("log", "1 or 2"),
    };
    ctx.set_function("log".into(), Function::new(log))
        .expect(fail);
    let extreme = |name: &'static str, pick: F2| {
        move |arg: &Num| match numbers(name, arg)?.as_slice() {
            [] => arity(name, "at least 1"),
            xs => Ok(Num::Float(
                // Cannot fail: the empty list matched the arm above.
                xs.iter().copied().reduce(pick).expect("not empty"),
            )),
        }
    };
    ctx.set_function("min".into(), Function::new(extreme("min", f64::min)))
        .expect(fail);
    ctx.set_function("max".into(), Function::new(extreme("max", f64::max)))
        .expect(fail);
    ctx
}

/// A function's argument as numbers: one value, or the elements of a tuple `f(a, b)`.
fn numbers(name: &str, arg: &Num) -> EvalexprResult<Vec<f64>> {
    let one = |v: &Num| match v {
        Num::Float(x) => Ok(*x),
        Num::Int(i) => Ok(*i as f64),
        other => Err(EvalexprError::CustomMessage(format!(
            "{name}() takes numbers, not {other}"
        ))),
    };
    match arg {
        Num::Tuple(items) => items.iter().map(one).collect(),
        Num::Empty => Ok(Vec::new()),
        v => Ok(vec![one(v)?]),
    }
}

fn arity(name: &str, n: &str) -> EvalexprResult<Num> {
    Err(EvalexprError::CustomMessage(format!(
        "{name}() takes {n} argument(s)"
    )))
}

/// A whole number within f64's exact range is written as a JSON integer (`2^10` gives `1024`).
pub fn to_json(x: f64) -> Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if x.fract() == 0.0 && x.abs() <= EXACT {
        json!(x as i64)
    } else {
        json!(x)
    }
}
