mod tokenizer;
