"""famtune plugin for Baichuan2-7B-Chat and Baichuan2-13B-Chat."""
