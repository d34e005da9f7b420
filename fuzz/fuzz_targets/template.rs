//! Templates: `Template::new` + `render`, and chat templates from a
//! `tokenizer_config.json` (`ChatTemplate::from_tokenizer_config_str`) and
//! from a file (`ChatTemplate::from_path`), rendered on a short chat.
#![no_main]
use kiln_prompt::{vars, ChatTemplate, Message, Template};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = Template::new("fuzz", text) {
        let v = vars(t.variables().iter().map(|n| (n.clone(), "x")));
        let _ = t.render(&v);
        let _ = t.render_lenient_unused(&v);
    }
    let chat = [Message::system("be brief"), Message::user("hi")];
    if let Ok(t) = ChatTemplate::from_tokenizer_config_str(text, "tokenizer_config.json", None) {
        let _ = t.render(&chat, true);
    }
    if let Ok(t) = ChatTemplate::new("fuzz", text) {
        let _ = t.render(&chat, false);
    }
    let dir = kiln_fuzz::scratch();
    let p = kiln_fuzz::put(dir.path(), "chat.jinja", data);
    let _ = ChatTemplate::from_path(&p);
});
